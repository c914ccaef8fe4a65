//! Reading progress events off the wire: [`ProgressEvent::from_json`] (the default schema) and
//! [`ProgressEvent::parse_any`] (either schema).
//!
//! Kept apart from `progress.rs` so that the event types depend on nothing: this module sits
//! above both schemas ([`crate::progress`], [`crate::legacy`]) and the error type.

use serde_json::Value;

use crate::error::{ProtocolError, RawExcerpt};
use crate::legacy::LegacyEvent;
use crate::progress::ProgressEvent;

impl ProgressEvent {
    /// Decodes an event in the default schema.
    pub fn from_json(raw: &[u8]) -> Result<Self, ProtocolError> {
        serde_json::from_slice(raw).map_err(|source| ProtocolError::Decode {
            what: "progress event",
            source,
            raw: RawExcerpt::new(raw),
        })
    }

    /// Decodes an event in either schema: the default one or the legacy EchoMe one
    /// (`status` `"progress"` with `percentage`, `"error"` instead of `"failed"`),
    /// normalised with [`LegacyEvent::into_event`].
    ///
    /// A message is taken as legacy when its `status` is `"progress"` or `"error"`, or when it
    /// carries `percentage` but no `progress`.
    pub fn parse_any(raw: &[u8]) -> Result<Self, ProtocolError> {
        let decode_err = |source| ProtocolError::Decode {
            what: "progress event",
            source,
            raw: RawExcerpt::new(raw),
        };
        let value: Value = serde_json::from_slice(raw).map_err(decode_err)?;
        let is_legacy = match &value {
            Value::Object(obj) => {
                matches!(
                    obj.get("status").and_then(Value::as_str),
                    Some("progress" | "error")
                ) || (obj.contains_key("percentage") && !obj.contains_key("progress"))
            }
            _ => false,
        };
        if is_legacy {
            let legacy: LegacyEvent = serde_json::from_value(value).map_err(decode_err)?;
            Ok(legacy.into_event())
        } else {
            serde_json::from_value(value).map_err(decode_err)
        }
    }
}
