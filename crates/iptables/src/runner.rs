//! The thin applier: runs `iptables-restore`, `iptables-save` and single
//! `iptables` commands for one IP family and one backend (legacy or nft).
//!
//! Everything the proxier writes goes through [`Iptables::restore`] (one
//! atomic `--noflush` transaction). The few rules kproxy does not own a chain
//! for — the jumps from the built-in chains — go through
//! [`Iptables::ensure_jump_rules`], which checks before it inserts, as
//! upstream's `EnsureRule` does.
//!
//! Processes are started through a [`CommandRunner`], so tests can point the
//! applier at fake scripts ([`SystemCommandRunner::with_bin_dir`]) or at a
//! private xtables lock file ([`SystemCommandRunner::with_env`]). A child
//! process inherits the network namespace of the thread that starts it, so
//! running these calls on a thread that entered a namespace applies the rules
//! there.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kproxy_model::IpFamily;
use tracing::{debug, warn};

use crate::normalize::{normalize, tokenize};

/// Which iptables implementation a command talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `iptables-legacy`: the x_tables kernel API, serialised by the xtables lock.
    Legacy,
    /// `iptables-nft`: iptables syntax on nf_tables.
    Nft,
}

impl Backend {
    /// "legacy" / "nft", as the binaries' suffix spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the operator asked for (`--iptables-backend` or similar).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendPreference {
    /// Choose like upstream's iptables-wrapper: see [`Iptables::detect`].
    #[default]
    Auto,
    Legacy,
    Nft,
}

/// The result of one process run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit code; `None` when the process was killed by a signal.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// What a child reads on stdin, written by a thread while the child runs.
/// A source may produce its bytes on demand, so that an input as large as
/// a full restore (≈ 17 MB at 10k services) never has to exist as one
/// buffer. It must write the same bytes every time: after a failed restore
/// it is written again to find the refused line.
pub trait StdinSource: Sync {
    fn write_to(&self, w: &mut dyn Write) -> io::Result<()>;

    /// The whole input, when it is held as one text anyway.
    fn as_text(&self) -> Option<&str> {
        None
    }
}

impl StdinSource for &str {
    fn write_to(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(self.as_bytes())
    }

    fn as_text(&self) -> Option<&str> {
        Some(self)
    }
}

impl StdinSource for String {
    fn write_to(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(self.as_bytes())
    }

    fn as_text(&self) -> Option<&str> {
        Some(self)
    }
}

/// A source's whole text: borrowed when it holds one, else written again.
fn source_text(input: &dyn StdinSource) -> std::borrow::Cow<'_, str> {
    match input.as_text() {
        Some(text) => text.into(),
        None => {
            let mut bytes = Vec::new();
            // Writing into a Vec does not fail.
            let _ = input.write_to(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned().into()
        }
    }
}

/// The seam between the applier and the processes it starts.
pub trait CommandRunner: fmt::Debug + Send + Sync {
    /// Runs `program` with `args`, feeding `stdin` if given, and waits for it.
    fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&dyn StdinSource>,
    ) -> io::Result<CommandOutput>;

    /// Whether `program` can be run (is an executable on the search path).
    fn exists(&self, program: &str) -> bool;

    /// An environment variable as the children see it (for
    /// `XTABLES_LOCKFILE`, which the lock-wait probe must agree on).
    fn env(&self, key: &str) -> Option<OsString> {
        std::env::var_os(key)
    }
}

/// Runs real processes, found on `PATH` or in a fixed directory.
#[derive(Clone, Debug, Default)]
pub struct SystemCommandRunner {
    bin_dir: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
}

impl SystemCommandRunner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Look programs up in `dir` only (tests put fake scripts there).
    pub fn with_bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// Set an environment variable for every child, e.g. `XTABLES_LOCKFILE`.
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    fn resolve(&self, program: &str) -> Option<PathBuf> {
        let dirs: Vec<PathBuf> = match &self.bin_dir {
            Some(dir) => vec![dir.clone()],
            None => std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default(),
        };
        dirs.into_iter()
            .map(|d| d.join(program))
            .find(|p| is_executable(p))
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

impl CommandRunner for SystemCommandRunner {
    fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&dyn StdinSource>,
    ) -> io::Result<CommandOutput> {
        let path = self.resolve(program).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{program} not found"))
        })?;
        let mut cmd = Command::new(path);
        cmd.args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        // Feed stdin from another thread: a large input and a chatty child
        // would otherwise deadlock on full pipes. A scoped thread borrows
        // the input: a full restore at 10k services is ≈ 17 MB, and a copy
        // would add that much to the sync's peak RSS.
        let pipe = child.stdin.take();
        let (out, written) = std::thread::scope(|scope| {
            let writer = match (stdin, pipe) {
                (Some(input), Some(pipe)) => Some(scope.spawn(move || {
                    let mut w = io::BufWriter::with_capacity(64 * 1024, pipe);
                    input.write_to(&mut w)?;
                    w.flush()
                })),
                _ => None,
            };
            let out = child.wait_with_output();
            (out, writer.map(|w| w.join()))
        });
        let out = out?;
        match written {
            // A child that fails early closes stdin: its exit status and
            // stderr say why, the broken pipe does not.
            Some(Ok(Err(e))) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e),
            Some(Err(_)) => return Err(io::Error::other("stdin writer thread panicked")),
            _ => {}
        }
        Ok(CommandOutput {
            code: out.status.code(),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    fn exists(&self, program: &str) -> bool {
        self.resolve(program).is_some()
    }

    fn env(&self, key: &str) -> Option<OsString> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var_os(key))
    }
}

/// The line of the restore input iptables-restore refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedLine {
    /// 1-based line number in the text given to [`Iptables::restore`].
    pub number: usize,
    /// That line, verbatim.
    pub text: String,
}

impl fmt::Display for FailedLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.number, self.text)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// No usable binary for the requested backend / family.
    #[error("no iptables binaries found: {0}")]
    NotFound(String),
    #[error("could not run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// The command ran and failed.
    #[error("{program} {}{}: {}", exit_text(*.code), .line.as_ref().map(|l| format!(" at {l}")).unwrap_or_default(), .stderr.trim())]
    Failed {
        program: String,
        args: Vec<String>,
        code: Option<i32>,
        stderr: String,
        /// For restore: the input line iptables-restore named, if it named one.
        line: Option<FailedLine>,
    },
}

fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exited with status {c}"),
        None => "was killed by a signal".to_string(),
    }
}

impl IptablesError {
    /// The command gave up waiting for the xtables lock (exit status 4 with
    /// the lock message): worth a retry, not a bug in the rules.
    pub fn is_lock_timeout(&self) -> bool {
        matches!(self, IptablesError::Failed { stderr, .. } if stderr.contains(LOCK_MESSAGE))
    }

    /// The offending input line of a failed restore.
    pub fn failed_line(&self) -> Option<&FailedLine> {
        match self {
            IptablesError::Failed { line, .. } => line.as_ref(),
            _ => None,
        }
    }
}

const LOCK_MESSAGE: &str = "Another app is currently holding the xtables lock";

/// What a successful restore took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreOutcome {
    /// Set when the restore had to wait for the xtables lock (legacy only:
    /// iptables-nft takes no lock). It is the whole run's duration, an upper
    /// bound on the wait, since iptables does not report the wait itself.
    pub lock_wait: Option<Duration>,
    pub duration: Duration,
}

/// Where a jump rule goes in its chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// `-I chain` (first rule), as upstream does for the KUBE-* jumps.
    Prepend,
    /// `-A chain`.
    Append,
}

/// A rule in a chain kproxy does not own (a built-in one), e.g.
/// `-t nat PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JumpRule {
    pub table: String,
    pub chain: String,
    pub position: Position,
    /// The rule's arguments after the chain, one argv entry each (no shell quoting).
    pub rulespec: Vec<String>,
}

impl JumpRule {
    /// The rule as an `iptables-restore` line (with its newline).
    pub fn restore_line(&self) -> String {
        let op = match self.position {
            Position::Prepend => "-I",
            Position::Append => "-A",
        };
        format!("{op} {} {}\n", self.chain, quote_args(&self.rulespec))
    }
}

/// Jump rules their chain's listing lacks.
#[derive(Debug, Default)]
pub struct MissingJumps<'a> {
    /// Nothing in the chain jumps to their target: adding them cannot
    /// duplicate a rule, so they may go into a restore transaction.
    pub absent: Vec<&'a JumpRule>,
    /// Some rule in the chain jumps to their target, spelled differently:
    /// only `-C` can tell whether it is this one.
    pub unsure: Vec<&'a JumpRule>,
}

/// The chains and rules of one table as `iptables-save` prints them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedTable {
    /// Every chain declared (`:NAME POLICY [p:b]`) or appended to, with its
    /// rules in order; each rule is the text after `-A NAME `, verbatim.
    pub chains: BTreeMap<String, Vec<String>>,
}

/// Parses `iptables-save` output for one table. With several tables in the
/// text their chains are merged; use [`parse_save_tables`] to keep them apart.
pub fn parse_save(text: &str) -> SavedTable {
    let mut out = SavedTable::default();
    for table in parse_save_tables(text).into_values() {
        for (chain, rules) in table.chains {
            out.chains.entry(chain).or_default().extend(rules);
        }
    }
    out
}

/// Parses `iptables-save` output into its tables (`*nat`, `*filter`, ...).
/// Lines before any `*table` header count as table "".
pub fn parse_save_tables(text: &str) -> BTreeMap<String, SavedTable> {
    let mut tables: BTreeMap<String, SavedTable> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            current = name.trim().to_string();
            tables.entry(current.clone()).or_default();
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next() {
                tables
                    .entry(current.clone())
                    .or_default()
                    .chains
                    .entry(chain.to_string())
                    .or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
            tables
                .entry(current.clone())
                .or_default()
                .chains
                .entry(chain.to_string())
                .or_default()
                .push(spec.to_string());
        }
    }
    tables
}

/// iptables for one IP family and one backend.
#[derive(Clone, Debug)]
pub struct Iptables {
    family: IpFamily,
    backend: Backend,
    /// Binary name stem: "iptables-nft", "ip6tables-legacy", or plain
    /// "iptables" when only the alternatives-managed names exist.
    stem: String,
    runner: Arc<dyn CommandRunner>,
    /// Seconds to wait for the xtables lock before failing.
    wait_seconds: u32,
    wait_interval: Arc<OnceLock<bool>>,
}

fn family_base(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "iptables",
        IpFamily::V6 => "ip6tables",
    }
}

impl Iptables {
    /// iptables for `family` through the `{ip6,}tables-{legacy,nft}` binaries.
    pub fn new(family: IpFamily, backend: Backend) -> Self {
        Self::with_runner(family, backend, Arc::new(SystemCommandRunner::new()))
    }

    /// Like [`Iptables::new`] with a custom process seam.
    pub fn with_runner(family: IpFamily, backend: Backend, runner: Arc<dyn CommandRunner>) -> Self {
        let stem = format!("{}-{}", family_base(family), backend.as_str());
        Self::from_parts(family, backend, stem, runner)
    }

    fn from_parts(
        family: IpFamily,
        backend: Backend,
        stem: String,
        runner: Arc<dyn CommandRunner>,
    ) -> Self {
        Iptables {
            family,
            backend,
            stem,
            runner,
            wait_seconds: 5,
            wait_interval: Arc::new(OnceLock::new()),
        }
    }

    /// How long a command waits for the xtables lock (default 5 s, as upstream).
    pub fn with_lock_timeout(mut self, seconds: u32) -> Self {
        self.wait_seconds = seconds.max(1);
        self
    }

    /// Chooses the backend, then builds [`Iptables`] for `family`.
    pub fn detect(family: IpFamily, preference: BackendPreference) -> Result<Self, IptablesError> {
        Self::detect_with_runner(family, preference, Arc::new(SystemCommandRunner::new()))
    }

    /// [`Iptables::detect`] with a custom process seam.
    ///
    /// `Auto` decides like upstream's iptables-wrapper, looking at both
    /// families so that both end up on the same backend: the backend whose
    /// mangle table holds kubelet's `KUBE-IPTABLES-HINT` / `KUBE-KUBELET-CANARY`
    /// (nft first); else the one holding any `KUBE-` chain; else the one
    /// with more rules; else the backend the `iptables` alternative points at.
    /// When the suffixed binaries are missing, the plain `iptables-restore`
    /// is used with the backend its `--version` names.
    pub fn detect_with_runner(
        family: IpFamily,
        preference: BackendPreference,
        runner: Arc<dyn CommandRunner>,
    ) -> Result<Self, IptablesError> {
        let base = family_base(family);
        let has = |b: Backend| runner.exists(&format!("{base}-{}-restore", b.as_str()));
        let (legacy, nft) = (has(Backend::Legacy), has(Backend::Nft));
        let plain = runner.exists(&format!("{base}-restore"));
        let plain_backend = || plain_backend(runner.as_ref(), base);

        let chosen = match preference {
            BackendPreference::Legacy if legacy => Backend::Legacy,
            BackendPreference::Nft if nft => Backend::Nft,
            BackendPreference::Legacy | BackendPreference::Nft => {
                let want = if preference == BackendPreference::Legacy {
                    Backend::Legacy
                } else {
                    Backend::Nft
                };
                if plain && plain_backend() == Some(want) {
                    return Ok(Self::from_parts(family, want, base.to_string(), runner));
                }
                return Err(IptablesError::NotFound(format!(
                    "{base}-{want}-restore is not installed and {base}-restore is not the {want} variant"
                )));
            }
            BackendPreference::Auto => match (legacy, nft) {
                (true, true) => auto_backend(runner.as_ref())
                    .unwrap_or_else(|| plain_backend().unwrap_or(Backend::Nft)),
                (true, false) => Backend::Legacy,
                (false, true) => Backend::Nft,
                (false, false) => {
                    if plain {
                        let backend = plain_backend().unwrap_or(Backend::Legacy);
                        return Ok(Self::from_parts(family, backend, base.to_string(), runner));
                    }
                    return Err(IptablesError::NotFound(format!(
                        "neither {base}-legacy-restore, {base}-nft-restore nor {base}-restore is installed"
                    )));
                }
            },
        };
        debug!(%family, backend = %chosen, "iptables backend chosen");
        Ok(Self::with_runner(family, chosen, runner))
    }

    pub fn family(&self) -> IpFamily {
        self.family
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The binary `iptables-restore` would be, e.g. "ip6tables-nft-restore".
    pub fn restore_program(&self) -> String {
        format!("{}-restore", self.stem)
    }

    fn save_program(&self) -> String {
        format!("{}-save", self.stem)
    }

    fn wait_args(&self) -> Vec<String> {
        vec![format!("--wait={}", self.wait_seconds)]
    }

    /// `--wait-interval` exists from iptables 1.6.2; from 1.8.8 it is
    /// deprecated and only prints a warning, so pass it only in between.
    fn supports_wait_interval(&self) -> bool {
        *self.wait_interval.get_or_init(|| {
            let out = self
                .runner
                .run(&self.stem, &["--version".to_string()], None);
            match out {
                Ok(out) if out.success() => parse_version(&String::from_utf8_lossy(&out.stdout))
                    .is_some_and(|v| ((1, 6, 2)..(1, 8, 8)).contains(&v)),
                _ => false,
            }
        })
    }

    fn run(
        &self,
        program: &str,
        args: Vec<String>,
        stdin: Option<&dyn StdinSource>,
    ) -> Result<CommandOutput, IptablesError> {
        self.runner
            .run(program, &args, stdin)
            .map_err(|source| IptablesError::Spawn {
                program: program.to_string(),
                source,
            })
    }

    fn failed(
        &self,
        program: &str,
        args: Vec<String>,
        out: &CommandOutput,
        line: Option<FailedLine>,
    ) -> IptablesError {
        IptablesError::Failed {
            program: program.to_string(),
            args,
            code: out.code,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            line,
        }
    }

    /// Applies `text` with `iptables-restore --noflush --counters --wait`:
    /// one atomic transaction per table; chains declared in `text` are
    /// flushed and rewritten, everything else is left alone. On failure
    /// nothing was applied and the error names the refused input line.
    pub fn restore(&self, text: &str) -> Result<RestoreOutcome, IptablesError> {
        self.restore_from(&text)
    }

    /// [`Iptables::restore`] of the text `input` writes; on failure it is
    /// written again to name the refused line.
    pub fn restore_from(&self, input: &dyn StdinSource) -> Result<RestoreOutcome, IptablesError> {
        let program = self.restore_program();
        let mut args = vec!["--noflush".to_string(), "--counters".to_string()];
        args.extend(self.wait_args());
        if self.supports_wait_interval() {
            args.extend(["--wait-interval".to_string(), "100000".to_string()]);
        }
        let contended_before = self.backend == Backend::Legacy
            && xtables_lock_contended(self.runner.env("XTABLES_LOCKFILE"));
        let start = Instant::now();
        let out = self.run(&program, args.clone(), Some(input))?;
        let duration = start.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.success() {
            let line = parse_failed_line(&stderr)
                .and_then(|n| locate_failed_line(&source_text(input), n, &stderr));
            let err = self.failed(&program, args, &out, line);
            warn!(error = %err, "iptables-restore failed");
            return Err(err);
        }
        let lock_wait = (contended_before || stderr.contains(LOCK_MESSAGE)).then_some(duration);
        Ok(RestoreOutcome {
            lock_wait,
            duration,
        })
    }

    /// `iptables-save -t table`.
    pub fn save(&self, table: &str) -> Result<String, IptablesError> {
        let program = self.save_program();
        let args = vec!["-t".to_string(), table.to_string()];
        let out = self.run(&program, args.clone(), None)?;
        if !out.success() {
            return Err(self.failed(&program, args, &out, None));
        }
        String::from_utf8(out.stdout).map_err(|e| IptablesError::Failed {
            program,
            args,
            code: Some(0),
            stderr: format!("output is not UTF-8: {e}"),
            line: None,
        })
    }

    /// Runs `iptables --wait=N -t table <args>`; `Ok(false)` on exit status 1
    /// (iptables' "no such rule / chain"), an error on anything else.
    fn check(&self, table: &str, rest: &[String]) -> Result<bool, IptablesError> {
        let mut args = self.wait_args();
        args.extend(["-t".to_string(), table.to_string()]);
        args.extend(rest.iter().cloned());
        let out = self.run(&self.stem, args.clone(), None)?;
        match out.code {
            Some(0) => Ok(true),
            Some(1) if !String::from_utf8_lossy(&out.stderr).contains(LOCK_MESSAGE) => Ok(false),
            _ => Err(self.failed(&self.stem, args, &out, None)),
        }
    }

    /// Whether `chain` exists in `table`.
    pub fn chain_exists(&self, table: &str, chain: &str) -> Result<bool, IptablesError> {
        self.check(
            table,
            &["-n".to_string(), "-L".to_string(), chain.to_string()],
        )
    }

    /// Creates `chain` in `table` unless it exists; returns whether it created it.
    pub fn ensure_chain(&self, table: &str, chain: &str) -> Result<bool, IptablesError> {
        if self.chain_exists(table, chain)? {
            return Ok(false);
        }
        // Exit status 1 here means someone created it in between: fine.
        self.check(table, &["-N".to_string(), chain.to_string()])
    }

    /// Makes sure each rule is present once. Rules are looked up in one
    /// `-S CHAIN` listing per chain first (a `-C` per rule costs ~70 ms with
    /// iptables-nft at 10k services, because it loads the table's chains;
    /// `-S` of a built-in chain ~3 ms); a rule not found there is checked
    /// with `-C` (the kernel's own comparison, in case our spelling differs
    /// from iptables') and inserted with `-I` or `-A` only when that also
    /// says it is missing; a missing jump target is created (empty) first,
    /// so the jumps can go in before the rules they lead to. Returns how
    /// many rules were added.
    pub fn ensure_jump_rules(&self, rules: &[JumpRule]) -> Result<usize, IptablesError> {
        let mut added = 0;
        for rule in self.jump_rules_not_listed(rules)? {
            // Before `-C`, which fails outright on a missing target.
            let target = rule.rulespec.iter().skip_while(|a| *a != "-j").nth(1);
            if let Some(target) = target {
                self.ensure_chain(&rule.table, target)?;
            }
            let mut check = vec!["-C".to_string(), rule.chain.clone()];
            check.extend(rule.rulespec.iter().cloned());
            if self.check(&rule.table, &check)? {
                continue;
            }
            let op = match rule.position {
                Position::Prepend => "-I",
                Position::Append => "-A",
            };
            let mut add = vec![op.to_string(), rule.chain.clone()];
            add.extend(rule.rulespec.iter().cloned());
            if !self.check(&rule.table, &add)? {
                let mut args = vec!["-t".to_string(), rule.table.clone()];
                args.extend(add);
                return Err(IptablesError::Failed {
                    program: self.stem.clone(),
                    args,
                    code: Some(1),
                    stderr: "could not add rule".to_string(),
                    line: None,
                });
            }
            debug!(table = %rule.table, chain = %rule.chain, rule = ?rule.rulespec, "added jump rule");
            added += 1;
        }
        Ok(added)
    }

    /// The rules that `iptables -S CHAIN` of their chain does not list,
    /// compared through [`crate::normalize`]. Empty once
    /// [`Iptables::ensure_jump_rules`] has run, unless the spelling of one
    /// differs from iptables' (then every ensure pays a `-C` for it).
    pub fn jump_rules_not_listed<'a>(
        &self,
        rules: &'a [JumpRule],
    ) -> Result<Vec<&'a JumpRule>, IptablesError> {
        let missing = self.missing_jump_rules(rules)?;
        Ok(missing.absent.into_iter().chain(missing.unsure).collect())
    }

    /// The rules that `iptables -S CHAIN` of their chain does not list, split
    /// by whether the chain has any rule jumping to the same target (see
    /// [`MissingJumps`]). One listing per chain.
    pub fn missing_jump_rules<'a>(
        &self,
        rules: &'a [JumpRule],
    ) -> Result<MissingJumps<'a>, IptablesError> {
        /// A chain's listed rules, normalized, and the targets they jump to.
        #[derive(Default)]
        struct Listing {
            specs: BTreeSet<String>,
            targets: BTreeSet<String>,
        }
        let mut listed: BTreeMap<(&str, &str), Listing> = BTreeMap::new();
        let mut missing = MissingJumps::default();
        for rule in rules {
            let key = (rule.table.as_str(), rule.chain.as_str());
            let listing = match listed.entry(key) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let args = vec!["-S".to_string(), rule.chain.clone()];
                    let prefix = format!("-A {} ", rule.chain);
                    let text = self.run_command(&rule.table, &args)?;
                    let mut listing = Listing::default();
                    for spec in text.lines().filter_map(|l| l.strip_prefix(&prefix)) {
                        let tokens = tokenize(spec);
                        if let Some(t) = tokens.iter().skip_while(|a| *a != "-j").nth(1) {
                            listing.targets.insert(t.clone());
                        }
                        listing.specs.insert(normalize(spec));
                    }
                    e.insert(listing)
                }
            };
            if listing
                .specs
                .contains(&normalize(&quote_args(&rule.rulespec)))
            {
                continue;
            }
            let target = rule.rulespec.iter().skip_while(|a| *a != "-j").nth(1);
            if target.is_some_and(|t| listing.targets.contains(t)) {
                missing.unsure.push(rule);
            } else {
                missing.absent.push(rule);
            }
        }
        Ok(missing)
    }

    /// Runs `iptables --wait=N -t table <args>` and returns its stdout. For
    /// the odd operation the typed methods do not cover (cleanup uses it).
    pub fn run_command(&self, table: &str, rest: &[String]) -> Result<String, IptablesError> {
        let mut args = self.wait_args();
        args.extend(["-t".to_string(), table.to_string()]);
        args.extend(rest.iter().cloned());
        let out = self.run(&self.stem, args.clone(), None)?;
        if !out.success() {
            return Err(self.failed(&self.stem, args, &out, None));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Counts what each backend holds, over both families, and picks as
/// iptables-wrapper does. `None` when nothing tells them apart.
fn auto_backend(runner: &dyn CommandRunner) -> Option<Backend> {
    let dump = |b: Backend, table: Option<&str>| -> String {
        let mut text = String::new();
        for base in ["iptables", "ip6tables"] {
            let args: Vec<String> = table
                .map(|t| vec!["-t".to_string(), t.to_string()])
                .unwrap_or_default();
            if let Ok(out) = runner.run(&format!("{base}-{}-save", b.as_str()), &args, None) {
                text.push_str(&String::from_utf8_lossy(&out.stdout));
            }
        }
        text
    };
    let kubelet_hint = |text: &str| {
        text.lines()
            .any(|l| l.starts_with(":KUBE-IPTABLES-HINT") || l.starts_with(":KUBE-KUBELET-CANARY"))
    };
    if kubelet_hint(&dump(Backend::Nft, Some("mangle"))) {
        return Some(Backend::Nft);
    }
    if kubelet_hint(&dump(Backend::Legacy, Some("mangle"))) {
        return Some(Backend::Legacy);
    }
    let (legacy, nft) = (dump(Backend::Legacy, None), dump(Backend::Nft, None));
    let kube_chains = |text: &str| text.lines().any(|l| l.starts_with(":KUBE-"));
    match (kube_chains(&legacy), kube_chains(&nft)) {
        (true, false) => return Some(Backend::Legacy),
        (false, true) => return Some(Backend::Nft),
        _ => {}
    }
    let rules = |text: &str| text.lines().filter(|l| l.starts_with('-')).count();
    let (l, n) = (rules(&legacy), rules(&nft));
    match l.cmp(&n) {
        std::cmp::Ordering::Greater => Some(Backend::Legacy),
        std::cmp::Ordering::Less => Some(Backend::Nft),
        std::cmp::Ordering::Equal => None,
    }
}

/// The backend the plain `iptables` binary is: its `--version` says
/// "(legacy)" or "(nf_tables)".
fn plain_backend(runner: &dyn CommandRunner, base: &str) -> Option<Backend> {
    let out = runner.run(base, &["--version".to_string()], None).ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("nf_tables") {
        Some(Backend::Nft)
    } else if text.contains("legacy") || parse_version(&text).is_some() {
        // Versions before the split print no variant: they are legacy.
        Some(Backend::Legacy)
    } else {
        None
    }
}

/// "iptables v1.8.9 (nf_tables)" → (1, 8, 9).
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// The line number iptables-restore names: "Error occurred at line: N"
/// (legacy and nft up to 1.8.x), "line N failed" (newer nft) or, for
/// errors the kernel reports at commit (iptables-nft 1.8.9), "line N: OP
/// failed (reason): ..." such as "line 5: CHAIN_DEL failed (Device or
/// resource busy): chain X".
fn parse_failed_line(stderr: &str) -> Option<usize> {
    for line in stderr.lines() {
        if let Some((n, tail)) = line
            .trim_start()
            .strip_prefix("line ")
            .and_then(|rest| rest.split_once(':'))
        {
            if tail.contains("failed") {
                if let Ok(n) = n.trim().parse() {
                    return Some(n);
                }
            }
        }
        if let Some(rest) = line.split("Error occurred at line:").nth(1) {
            if let Ok(n) = rest.trim().parse() {
                return Some(n);
            }
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        for w in words.windows(3) {
            if w[0] == "line" && w[2].starts_with("failed") {
                if let Ok(n) = w[1].trim_end_matches(':').parse() {
                    return Some(n);
                }
            }
        }
    }
    None
}

/// Maps the reported line number back to the input. iptables-nft checks
/// some things only when the table is committed and then names the
/// `COMMIT` line; for a missing jump target ("Chain 'X' does not exist")
/// the rule jumping to X in that table is the real culprit.
fn locate_failed_line(text: &str, number: usize, stderr: &str) -> Option<FailedLine> {
    let lines: Vec<&str> = text.lines().collect();
    let reported = lines.get(number.checked_sub(1)?)?;
    if reported.trim() == "COMMIT" {
        if let Some(chain) = stderr
            .split("Chain '")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
        {
            let start = lines[..number - 1]
                .iter()
                .rposition(|l| l.starts_with('*'))
                .unwrap_or(0);
            for (i, l) in lines.iter().enumerate().take(number - 1).skip(start) {
                let words: Vec<&str> = l.split_whitespace().collect();
                if words
                    .windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1] == chain)
                {
                    return Some(FailedLine {
                        number: i + 1,
                        text: l.to_string(),
                    });
                }
            }
        }
    }
    Some(FailedLine {
        number,
        text: reported.to_string(),
    })
}

/// Whether another process holds the xtables lock right now (legacy
/// iptables serialises on it and does not say whether it waited). Probes
/// with util-linux `flock --nonblock --shared`, released at once; without
/// that tool it reports no contention. (std's `File::try_lock_shared` is
/// newer than our MSRV, and unsafe code is reserved for `setns`.)
fn xtables_lock_contended(lock_file: Option<OsString>) -> bool {
    let path = lock_file.unwrap_or_else(|| "/run/xtables.lock".into());
    if !Path::new(&path).exists() {
        return false;
    }
    Command::new("flock")
        .arg("--nonblock")
        .arg("--shared")
        .arg(&path)
        .arg("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.code() == Some(1))
        .unwrap_or(false)
}

/// argv entries as one rule spec that [`crate::normalize::tokenize`] splits
/// back into the same entries.
fn quote_args(args: &[String]) -> String {
    let quote = |a: &String| {
        if !a.is_empty()
            && !a
                .chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '\\')
        {
            return a.clone();
        }
        let escaped = a.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{escaped}\"")
    };
    args.iter().map(quote).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_args_tokenize_back() {
        let args: Vec<String> = ["-m", "comment", "--comment", "a \"b\" \\c", "", "-j", "X"]
            .map(String::from)
            .into();
        let text = quote_args(&args);
        assert_eq!(text, r#"-m comment --comment "a \"b\" \\c" "" -j X"#);
        assert_eq!(crate::normalize::tokenize(&text), args);
    }

    #[test]
    fn parses_save_output() {
        let text = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-EMPTY - [0:0]\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A KUBE-SERVICES -d 10.0.0.1/32 -p tcp -j KUBE-SVC-X\n-A KUBE-SERVICES -j RETURN\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        let tables = parse_save_tables(text);
        let nat = &tables["nat"];
        assert_eq!(
            nat.chains["PREROUTING"],
            vec!["-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"]
        );
        assert_eq!(
            nat.chains["KUBE-SERVICES"],
            vec!["-d 10.0.0.1/32 -p tcp -j KUBE-SVC-X", "-j RETURN"]
        );
        assert!(nat.chains["KUBE-EMPTY"].is_empty());
        assert!(!nat.chains.contains_key("INPUT"));
        assert_eq!(tables["filter"].chains["INPUT"], vec!["-j ACCEPT"]);
        assert_eq!(parse_save(text).chains.len(), 4);
    }

    #[test]
    fn parses_failed_line_formats() {
        assert_eq!(
            parse_failed_line(
                "iptables-restore v1.8.9 (legacy): x\nError occurred at line: 4\nTry"
            ),
            Some(4)
        );
        assert_eq!(
            parse_failed_line("iptables-nft-restore: line 12 failed: Invalid argument"),
            Some(12)
        );
        assert_eq!(
            parse_failed_line(
                "iptables-nft-restore v1.8.9 (nf_tables): \nline 5: CHAIN_DEL failed (Device or resource busy): chain KUBE-SVC-X\n"
            ),
            Some(5)
        );
        assert_eq!(parse_failed_line("something else"), None);
    }

    #[test]
    fn maps_commit_errors_to_the_jump() {
        let text = "*filter\n:A - [0:0]\n-A A -j ACCEPT\n-A A -j MISSING\nCOMMIT\n";
        let l = locate_failed_line(
            text,
            5,
            "iptables-nft-restore v1.8.9 (nf_tables): Chain 'MISSING' does not exist",
        )
        .unwrap();
        assert_eq!(
            l,
            FailedLine {
                number: 4,
                text: "-A A -j MISSING".into()
            }
        );
        let l = locate_failed_line(text, 3, "bad").unwrap();
        assert_eq!(
            l,
            FailedLine {
                number: 3,
                text: "-A A -j ACCEPT".into()
            }
        );
        assert_eq!(locate_failed_line(text, 99, ""), None);
    }

    #[test]
    fn parses_versions() {
        assert_eq!(
            parse_version("iptables v1.8.9 (nf_tables)\n"),
            Some((1, 8, 9))
        );
        assert_eq!(parse_version("iptables v1.6.1\n"), Some((1, 6, 1)));
        assert_eq!(parse_version("nope"), None);
    }
}
