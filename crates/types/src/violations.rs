use std::fmt;

/// One invalid request field: its path as named in the API (`amount.minor_units`)
/// and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field in the request message, in proto field names.
    pub field: String,
    /// What is wrong, in words a caller can act on.
    pub description: String,
}

/// Every problem found in one request, so a caller fixes them all at once
/// instead of discovering them one round trip at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Records a problem with `field`.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation { field: field.into(), description: description.into() });
    }

    /// Keeps the parsed value, or records why `field` is invalid.
    pub fn check<T, E: fmt::Display>(&mut self, field: &str, parsed: Result<T, E>) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(error) => {
                self.add(field, error.to_string());
                None
            }
        }
    }

    /// The same problems with `prefix` before each field (`requests[3].` + `amount`).
    pub fn prefixed(self, prefix: &str) -> Self {
        Self(
            self.0
                .into_iter()
                .map(|v| FieldViolation { field: format!("{prefix}{}", v.field), ..v })
                .collect(),
        )
    }

    /// The recorded problems, in the order found.
    pub fn list(&self) -> &[FieldViolation] {
        &self.0
    }

    /// True when no field is invalid.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` when nothing was recorded, else every violation.
    pub fn finish<T>(self, value: impl FnOnce() -> Option<T>) -> Result<T, Self> {
        if self.is_empty() {
            // With no violation every checked field parsed, so `value` is whole.
            value().ok_or(self)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", v.field, v.description)?;
        }
        Ok(())
    }
}
