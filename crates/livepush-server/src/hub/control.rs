//! Control commands: reliable messages of type `control` that also change the room.

use serde::Deserialize;
use serde_json::value::RawValue;

/// The type name of control messages.
pub const CONTROL_TYPE: &str = "control";

/// What a control message does to its room when it is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Members get the message, then `left`; joins answer `room_closed` until `open`.
    Close,
    Open,
    /// Terminal `send` answers `muted`.
    Mute,
    Unmute,
    /// Delivered only (the app switches its player).
    StreamSwitch,
}

impl Action {
    /// Read `data.action`. Unknown actions are refused so that a typo does not go out as a
    /// message that silently does nothing.
    pub fn parse(data: &RawValue) -> Result<Action, String> {
        #[derive(Deserialize)]
        struct Data<'a> {
            #[serde(borrow)]
            action: Option<&'a str>,
        }
        let d: Data<'_> = serde_json::from_str(data.get())
            .map_err(|_| "control `data` must be an object with an `action`".to_owned())?;
        match d.action {
            Some("close") => Ok(Action::Close),
            Some("open") => Ok(Action::Open),
            Some("mute") => Ok(Action::Mute),
            Some("unmute") => Ok(Action::Unmute),
            Some("stream_switch") => Ok(Action::StreamSwitch),
            Some(other) => Err(format!(
                "unknown control action {other:?} (close, open, mute, unmute, stream_switch)"
            )),
            None => Err("control `data` needs an `action`".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn parses_actions() {
        assert_eq!(
            Action::parse(&raw(r#"{"action":"close"}"#)),
            Ok(Action::Close)
        );
        assert_eq!(
            Action::parse(&raw(r#"{"action":"stream_switch","url":"x"}"#)),
            Ok(Action::StreamSwitch)
        );
        assert!(Action::parse(&raw(r#"{"action":"explode"}"#)).is_err());
        assert!(Action::parse(&raw(r#"{}"#)).is_err());
        assert!(Action::parse(&raw(r#"[1]"#)).is_err());
    }
}
