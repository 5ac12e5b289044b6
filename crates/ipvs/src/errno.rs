//! errno text for error messages: `File exists (EEXIST)`.
//!
//! Our own table rather than strerror: the text is stable across libcs and
//! the symbolic name is what people search for.

const TABLE: &[(i32, &str, &str)] = &[
    (libc::EPERM, "EPERM", "Operation not permitted"),
    (libc::ENOENT, "ENOENT", "No such file or directory"),
    (libc::ESRCH, "ESRCH", "No such process"),
    (libc::EINTR, "EINTR", "Interrupted system call"),
    (libc::EIO, "EIO", "Input/output error"),
    (libc::ENXIO, "ENXIO", "No such device or address"),
    (libc::E2BIG, "E2BIG", "Argument list too long"),
    (libc::EAGAIN, "EAGAIN", "Resource temporarily unavailable"),
    (libc::ENOMEM, "ENOMEM", "Cannot allocate memory"),
    (libc::EACCES, "EACCES", "Permission denied"),
    (libc::EFAULT, "EFAULT", "Bad address"),
    (libc::EBUSY, "EBUSY", "Device or resource busy"),
    (libc::EEXIST, "EEXIST", "File exists"),
    (libc::ENODEV, "ENODEV", "No such device"),
    (libc::EINVAL, "EINVAL", "Invalid argument"),
    (libc::ENOSPC, "ENOSPC", "No space left on device"),
    (libc::ERANGE, "ERANGE", "Numerical result out of range"),
    (libc::EMSGSIZE, "EMSGSIZE", "Message too long"),
    (
        libc::EPROTONOSUPPORT,
        "EPROTONOSUPPORT",
        "Protocol not supported",
    ),
    (libc::EOPNOTSUPP, "EOPNOTSUPP", "Operation not supported"),
    (
        libc::EAFNOSUPPORT,
        "EAFNOSUPPORT",
        "Address family not supported by protocol",
    ),
    (
        libc::EADDRNOTAVAIL,
        "EADDRNOTAVAIL",
        "Cannot assign requested address",
    ),
    (libc::ENOBUFS, "ENOBUFS", "No buffer space available"),
    (libc::ENOTSUP, "ENOTSUP", "Operation not supported"),
];

/// `Description (NAME)`, or `errno N` for one we do not know.
pub fn errno_text(errno: i32) -> String {
    match TABLE.iter().find(|(n, _, _)| *n == errno) {
        Some((_, name, text)) => format!("{text} ({name})"),
        None => format!(
            "{} (errno {errno})",
            std::io::Error::from_raw_os_error(errno).kind()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(errno_text(libc::EEXIST), "File exists (EEXIST)");
        assert_eq!(
            errno_text(libc::ENOENT),
            "No such file or directory (ENOENT)"
        );
        assert!(errno_text(4095).ends_with("(errno 4095)"));
    }
}
