//! Control commands: reliable messages of type `control` that also change the room.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::store::RoomFlags;

/// The type name of control messages.
pub const CONTROL_TYPE: &str = "control";

/// Why a control message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("control `data` must be an object with an `action`")]
    NotAnObject,
    #[error("control `data` needs an `action`")]
    NoAction,
    #[error("unknown control action {0:?} (close, open, mute, unmute, stream_switch)")]
    UnknownAction(String),
}

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
    /// The room's flags after this action.
    pub fn apply(self, flags: RoomFlags) -> RoomFlags {
        match self {
            Action::Close => RoomFlags {
                closed: true,
                ..flags
            },
            Action::Open => RoomFlags {
                closed: false,
                ..flags
            },
            Action::Mute => RoomFlags {
                muted: true,
                ..flags
            },
            Action::Unmute => RoomFlags {
                muted: false,
                ..flags
            },
            Action::StreamSwitch => flags,
        }
    }

    /// The action of an encoded `msg` frame, if it is a control message (used for messages
    /// read back from a history, which do not carry it beside the frame).
    pub fn of_frame(frame: &[u8]) -> Option<Action> {
        #[derive(Deserialize)]
        struct Msg<'a> {
            #[serde(rename = "type", borrow)]
            ty: &'a str,
            #[serde(borrow)]
            data: &'a RawValue,
        }
        let m: Msg<'_> = serde_json::from_slice(frame).ok()?;
        if m.ty != CONTROL_TYPE {
            return None;
        }
        Action::parse(m.data).ok()
    }

    /// Read `data.action`. Unknown actions are refused so that a typo does not go out as a
    /// message that silently does nothing.
    pub fn parse(data: &RawValue) -> Result<Action, ControlError> {
        #[derive(Deserialize)]
        struct Data<'a> {
            #[serde(borrow)]
            action: Option<&'a str>,
        }
        let d: Data<'_> =
            serde_json::from_str(data.get()).map_err(|_| ControlError::NotAnObject)?;
        match d.action {
            Some("close") => Ok(Action::Close),
            Some("open") => Ok(Action::Open),
            Some("mute") => Ok(Action::Mute),
            Some("unmute") => Ok(Action::Unmute),
            Some("stream_switch") => Ok(Action::StreamSwitch),
            Some(other) => Err(ControlError::UnknownAction(other.to_owned())),
            None => Err(ControlError::NoAction),
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

    #[test]
    fn actions_are_read_back_from_encoded_frames() {
        let close =
            livepush_proto::encode_msg("r", "control", &raw(r#"{"action":"close"}"#), Some(3), 1);
        assert_eq!(Action::of_frame(&close), Some(Action::Close));
        let gift =
            livepush_proto::encode_msg("r", "gift", &raw(r#"{"action":"close"}"#), Some(4), 1);
        assert_eq!(Action::of_frame(&gift), None);
        assert_eq!(Action::of_frame(b"not json"), None);
    }
}
