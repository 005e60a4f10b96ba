//! System lines as typed events.
//!
//! A system line (membership, devices, key changes, a gap, a late message,
//! a warning) is stored with the [`SystemEvent`] it says, so that each
//! front end renders it in its own words and language; the stored text is
//! [`SystemEvent::render`], a neutral English rendering with no advice
//! tied to one front end (the command line adds its commands, see
//! [`SystemEvent::advice`]). Persisted (JSON in `messages.event`) and
//! shown in `--json` output: a change of form is a visible decision (see
//! the snapshot test).

use serde::{Deserialize, Serialize};

/// What a system line says. Handles are account handles; "you" is decided
/// when rendering, by the reader's own handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SystemEvent {
    /// This device joined a group (another device of the account added it).
    JoinedGroup {
        /// The group's name.
        group: String,
    },
    /// Someone added this account to a group.
    AddedYou {
        /// Who.
        by: String,
        /// The group's name.
        group: String,
    },
    /// A member renamed the group.
    Renamed {
        /// Who.
        by: String,
        /// The new name.
        name: String,
    },
    /// A member added an account.
    Added {
        /// Who.
        by: String,
        /// Whom.
        member: String,
    },
    /// A member account's new device joined.
    NewDevice {
        /// Whose.
        member: String,
    },
    /// A member left.
    Left {
        /// Who.
        member: String,
    },
    /// A member removed one device of an account that stays.
    RemovedDevice {
        /// Who.
        by: String,
        /// Whose.
        member: String,
    },
    /// A member removed an account.
    Removed {
        /// Who.
        by: String,
        /// Whom.
        member: String,
    },
    /// Messages of a sender's device never arrived (the sequence skipped).
    Gap {
        /// Whose.
        from: String,
        /// How many.
        missing: u64,
    },
    /// The message before this line arrived after a later one.
    Late {
        /// Whose.
        from: String,
    },
    /// A contact's identity key changed: compare safety numbers again.
    KeyChanged {
        /// Whose.
        member: String,
    },
    /// A member device the key directory does not confirm was added;
    /// sending in the conversation waits for the user to accept or remove it.
    DeviceNotConfirmed {
        /// Who added it ("handle/device").
        by: String,
        /// Whose device.
        member: String,
        /// The device id (hex).
        device: String,
        /// The conversation as the user names it.
        target: String,
        /// What the directory said.
        why: String,
    },
    /// A member tried to edit another account's message (or a system
    /// line); it was not applied.
    EditRefused {
        /// Who tried.
        from: String,
        /// Whose message it is.
        author: String,
    },
    /// A member tried to delete another account's message (or a system
    /// line); it was not applied.
    DeleteRefused {
        /// Who tried.
        from: String,
        /// Whose message it is.
        author: String,
    },
    /// Something refused or suspicious, in words.
    Warning {
        /// What.
        text: String,
    },
    /// Any other line, in words (a group re-created, a device accepted).
    Note {
        /// What.
        text: String,
    },
    /// A member set the conversation's disappearing-messages timer.
    Disappearing {
        /// Who.
        by: String,
        /// The timer in seconds; `None`: turned off.
        seconds: Option<u32>,
    },
    /// A call: someone called, answered, was busy, hung up; or a missed call.
    Call {
        /// Who (the caller, for a missed call).
        by: String,
        /// The call id (hex).
        call: String,
        /// What happened.
        action: crate::calls::CallLine,
    },
}

/// What a front end may offer the user after a system line.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Advice {
    /// Compare safety numbers with `handle` again.
    Verify {
        /// Whom.
        handle: String,
    },
    /// Accept (or remove) the device `device` in `target`.
    AcceptDevice {
        /// The conversation as the user names it.
        target: String,
        /// The device id (hex).
        device: String,
    },
}

/// A timer for people, in its largest whole unit: `30s`, `5m`, `1h`,
/// `2d`, `1w` (and `90s` rather than a rounded `1m`).
pub fn format_duration(seconds: u32) -> String {
    for (unit, size) in [("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)] {
        if seconds >= size && seconds % size == 0 {
            return format!("{}{unit}", seconds / size);
        }
    }
    format!("{seconds}s")
}

impl SystemEvent {
    /// The line in neutral English, for the reader whose handle is `me`.
    pub fn render(&self, me: &str) -> String {
        let who = |h: &str| if h == me { "you".to_string() } else { h.to_string() };
        let whose = |h: &str| if h == me { "your message".to_string() } else { format!("{h}'s message") };
        match self {
            SystemEvent::JoinedGroup { group } => format!("this device joined {group}"),
            SystemEvent::AddedYou { by, group } => format!("{by} added you to {group}"),
            SystemEvent::Renamed { by, name } => format!("{} renamed the group to {name}", who(by)),
            SystemEvent::Added { by, member } => format!("{} added {}", who(by), who(member)),
            SystemEvent::NewDevice { member } => format!("{}'s new device joined", who(member)),
            SystemEvent::Left { member } => format!("{} left", who(member)),
            SystemEvent::RemovedDevice { by, member } => {
                format!("{} removed a device of {}", who(by), who(member))
            }
            SystemEvent::Removed { by, member } => format!("{} removed {}", who(by), who(member)),
            SystemEvent::Gap { from, missing } => {
                let what = if *missing == 1 { "1 message".to_string() } else { format!("{missing} messages") };
                format!("{what} from {} did not arrive: the server dropped or is withholding them", who(from))
            }
            SystemEvent::Late { from } => format!("the message above from {} arrived out of order", who(from)),
            SystemEvent::KeyChanged { member } => {
                format!("warning: {member}'s identity key changed; compare safety numbers again")
            }
            SystemEvent::DeviceNotConfirmed { by, member, device, target, why } => format!(
                "warning: {by} added a device {device} of {member} to {target} that the key directory does not \
                 confirm ({why}); sending there is blocked until you accept it or remove it"
            ),
            SystemEvent::EditRefused { from, author } => {
                format!(
                    "warning: {} tried to edit {}; only its author may, so it was refused",
                    who(from),
                    whose(author)
                )
            }
            SystemEvent::DeleteRefused { from, author } => {
                format!(
                    "warning: {} tried to delete {}; only its author may, so it was refused",
                    who(from),
                    whose(author)
                )
            }
            SystemEvent::Warning { text } => format!("warning: {text}"),
            SystemEvent::Note { text } => text.clone(),
            SystemEvent::Disappearing { by, seconds: Some(s) } => {
                format!("{} set disappearing messages to {}", who(by), format_duration(*s))
            }
            SystemEvent::Disappearing { by, seconds: None } => {
                format!("{} turned off disappearing messages", who(by))
            }
            SystemEvent::Call { by, action, .. } => {
                use crate::calls::CallLine;
                let mine = by == me;
                match action {
                    CallLine::Offer if mine => "you called".to_string(),
                    CallLine::Offer => format!("{by} is calling"),
                    CallLine::Ringing => format!("ringing at {}", who(by)),
                    CallLine::Answer => format!("{} answered the call", who(by)),
                    CallLine::Busy if mine => "you were busy".to_string(),
                    CallLine::Busy => format!("{by} is busy"),
                    CallLine::Hangup => format!("{} hung up", who(by)),
                    CallLine::Missed => format!("missed call from {by}"),
                }
            }
        }
    }

    /// What the user may do about it, if anything.
    pub fn advice(&self) -> Option<Advice> {
        match self {
            SystemEvent::KeyChanged { member } => Some(Advice::Verify { handle: member.clone() }),
            SystemEvent::DeviceNotConfirmed { target, device, .. } => {
                Some(Advice::AcceptDevice { target: target.clone(), device: device.clone() })
            }
            _ => None,
        }
    }

    /// The stored form.
    ///
    /// # Errors
    /// Never in practice (every field is a string or a number).
    pub fn encode(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// Reads the stored form; `None` for an event of a newer version (its
    /// stored text is shown instead).
    pub fn decode(s: &str) -> Option<Self> {
        serde_json::from_str(s).ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;
    use crate::calls::CallLine;

    /// The stored form of every event, and its neutral rendering: a change
    /// of either is a visible decision (stored rows keep the old form).
    #[test]
    fn stored_form_and_rendering_are_stable() {
        let s = |t: &str| t.to_string();
        let cases = [
            (SystemEvent::JoinedGroup { group: s("club") }, r#"{"event":"joined_group","group":"club"}"#, "this device joined club"),
            (SystemEvent::AddedYou { by: s("bob"), group: s("club") }, r#"{"event":"added_you","by":"bob","group":"club"}"#, "bob added you to club"),
            (SystemEvent::Renamed { by: s("me"), name: s("new") }, r#"{"event":"renamed","by":"me","name":"new"}"#, "you renamed the group to new"),
            (SystemEvent::Added { by: s("bob"), member: s("carol") }, r#"{"event":"added","by":"bob","member":"carol"}"#, "bob added carol"),
            (SystemEvent::NewDevice { member: s("bob") }, r#"{"event":"new_device","member":"bob"}"#, "bob's new device joined"),
            (SystemEvent::Left { member: s("me") }, r#"{"event":"left","member":"me"}"#, "you left"),
            (SystemEvent::RemovedDevice { by: s("bob"), member: s("bob") }, r#"{"event":"removed_device","by":"bob","member":"bob"}"#, "bob removed a device of bob"),
            (SystemEvent::Removed { by: s("bob"), member: s("me") }, r#"{"event":"removed","by":"bob","member":"me"}"#, "bob removed you"),
            (SystemEvent::Gap { from: s("bob"), missing: 2 }, r#"{"event":"gap","from":"bob","missing":2}"#, "2 messages from bob did not arrive: the server dropped or is withholding them"),
            (SystemEvent::Late { from: s("bob") }, r#"{"event":"late","from":"bob"}"#, "the message above from bob arrived out of order"),
            (SystemEvent::KeyChanged { member: s("bob") }, r#"{"event":"key_changed","member":"bob"}"#, "warning: bob's identity key changed; compare safety numbers again"),
            (
                SystemEvent::DeviceNotConfirmed { by: s("bob/01"), member: s("carol"), device: s("02"), target: s("club"), why: s("unknown") },
                r#"{"event":"device_not_confirmed","by":"bob/01","member":"carol","device":"02","target":"club","why":"unknown"}"#,
                "warning: bob/01 added a device 02 of carol to club that the key directory does not confirm (unknown); sending there is blocked until you accept it or remove it",
            ),
            (
                SystemEvent::EditRefused { from: s("mallory"), author: s("me") },
                r#"{"event":"edit_refused","from":"mallory","author":"me"}"#,
                "warning: mallory tried to edit your message; only its author may, so it was refused",
            ),
            (
                SystemEvent::DeleteRefused { from: s("mallory"), author: s("bob") },
                r#"{"event":"delete_refused","from":"mallory","author":"bob"}"#,
                "warning: mallory tried to delete bob's message; only its author may, so it was refused",
            ),
            (SystemEvent::Warning { text: s("refused") }, r#"{"event":"warning","text":"refused"}"#, "warning: refused"),
            (SystemEvent::Note { text: s("as it was") }, r#"{"event":"note","text":"as it was"}"#, "as it was"),
            (SystemEvent::Call { by: s("alice"), call: s("c1"), action: CallLine::Offer }, r#"{"event":"call","by":"alice","call":"c1","action":"offer"}"#, "alice is calling"),
            (SystemEvent::Call { by: s("me"), call: s("c1"), action: CallLine::Offer }, r#"{"event":"call","by":"me","call":"c1","action":"offer"}"#, "you called"),
            (SystemEvent::Call { by: s("bob"), call: s("c1"), action: CallLine::Answer }, r#"{"event":"call","by":"bob","call":"c1","action":"answer"}"#, "bob answered the call"),
            (SystemEvent::Call { by: s("bob"), call: s("c1"), action: CallLine::Busy }, r#"{"event":"call","by":"bob","call":"c1","action":"busy"}"#, "bob is busy"),
            (SystemEvent::Call { by: s("me"), call: s("c1"), action: CallLine::Hangup }, r#"{"event":"call","by":"me","call":"c1","action":"hangup"}"#, "you hung up"),
            (SystemEvent::Disappearing { by: s("bob"), seconds: Some(3600) }, r#"{"event":"disappearing","by":"bob","seconds":3600}"#, "bob set disappearing messages to 1h"),
            (SystemEvent::Disappearing { by: s("me"), seconds: Some(90) }, r#"{"event":"disappearing","by":"me","seconds":90}"#, "you set disappearing messages to 90s"),
            (SystemEvent::Disappearing { by: s("bob"), seconds: None }, r#"{"event":"disappearing","by":"bob","seconds":null}"#, "bob turned off disappearing messages"),
            (SystemEvent::Call { by: s("alice"), call: s("c1"), action: CallLine::Missed }, r#"{"event":"call","by":"alice","call":"c1","action":"missed"}"#, "missed call from alice"),
        ];
        for (event, json, text) in cases {
            assert_eq!(event.encode().expect("encode"), json);
            assert_eq!(SystemEvent::decode(json), Some(event.clone()));
            assert_eq!(event.render("me"), text);
        }
        // An event of a newer version is not an error: its text is shown.
        assert_eq!(SystemEvent::decode(r#"{"event":"from_the_future"}"#), None);
    }
}
