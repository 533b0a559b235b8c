//! A bad value tied to the field it is about, and the name checks that
//! Kubernetes objects impose.

/// A problem with one field of a request or config; the message says what
/// was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }

    /// The same error under `prefix` (`pods[1]` + `target` → `pods[1].target`).
    pub fn within(self, prefix: &str) -> Self {
        if prefix.is_empty() { self } else { Self { field: format!("{prefix}.{}", self.field), ..self } }
    }
}

/// RFC 1123 label: lower-case alphanumerics and '-', starting and ending alphanumeric.
pub fn validate_dns_label(field: &str, s: &str, max: usize) -> Result<(), FieldError> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "{s:?} is not valid; expected a DNS label: 1 to {max} lower-case letters, digits or '-', starting and ending with a letter or digit"
            ),
        ))
    }
}

/// RFC 1123 subdomain, the form of most Kubernetes object names.
pub fn validate_dns_subdomain(field: &str, s: &str) -> Result<(), FieldError> {
    let ok = !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| validate_dns_label(field, l, 63).is_ok());
    if ok { Ok(()) } else { Err(FieldError::new(field, format!("{s:?} is not a valid Kubernetes object name"))) }
}
