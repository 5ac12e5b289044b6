//! Plain ANSI colors, only when stdout is a terminal (and `NO_COLOR` is unset).

use std::io::IsTerminal;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Style {
    pub color: bool,
}

impl Style {
    pub fn detect() -> Style {
        Style {
            color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    pub fn added(self, text: &str) -> String {
        self.paint("32", text)
    }

    pub fn removed(self, text: &str) -> String {
        self.paint("31", text)
    }

    pub fn header(self, text: &str) -> String {
        self.paint("1", text)
    }

    pub fn dim(self, text: &str) -> String {
        self.paint("2", text)
    }

    pub fn chain(self, text: &str) -> String {
        self.paint("36", text)
    }

    pub fn warn(self, text: &str) -> String {
        self.paint("33", text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_without_color() {
        assert_eq!(Style { color: false }.added("+x"), "+x");
        assert_eq!(Style { color: true }.removed("-x"), "\x1b[31m-x\x1b[0m");
    }
}
