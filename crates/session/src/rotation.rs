//! The periodic key updates' policy: when a device replaces its own keys
//! in a conversation (post-compromise security), and when a member that
//! stopped doing so is shown as stale. The client acts on it
//! (`subrosa-client`'s `rotation.rs` has the why at length).

/// A day, in ms.
pub const DAY_MS: u64 = 24 * 3_600_000;
/// A device updates its keys in a conversation after sending this many
/// messages there.
pub const UPDATE_AFTER_MESSAGES: u64 = 100;
/// … or this long after its last update there.
pub const UPDATE_PERIOD_MS: u64 = DAY_MS;
/// Conversations larger than this update less often.
pub const LARGE_GROUP_MEMBERS: usize = 100;
/// The update period in a large conversation.
pub const LARGE_GROUP_PERIOD_MS: u64 = 7 * DAY_MS;
/// A device updates its keys after sending this many messages in a
/// conversation, whatever its size and however recent its last update.
///
/// Receipts go to their author's devices only, so every other member skips
/// their generations of this device's sending ratchet; an MLS receiver
/// refuses a message more than 1,024 generations ahead of the last one it
/// saw from that sender (mls-rs's `MAX_RATCHET_BACK_HISTORY`), which would
/// make this device's next message to all unreadable to a member who missed
/// that many. A commit starts a new epoch, and every ratchet at generation 0.
pub const UPDATE_AFTER_MESSAGES_ANY_SIZE: u64 = 500;
/// Past this many messages since its last update, a device queues no more
/// receipts in the conversation until an update lands (receipts are not
/// messages the user wrote; an update due since 500 that could not be made
/// yet, offline for instance, must not let the gap pass 1,024).
pub const RECEIPTS_STOP_AFTER_MESSAGES: u64 = 900;
/// A member that has not committed for this long is shown as stale.
pub const STALE_AFTER_MS: u64 = 30 * DAY_MS;
/// Key packages are replaced when older than this.
pub const KEY_PACKAGE_MAX_AGE_MS: u64 = 7 * DAY_MS;

/// Whether a device should commit an update of its keys now, given the time,
/// its last update in the conversation, the messages it sent there since and
/// the number of member devices. A clock that went backwards never triggers.
pub fn update_due(now_ms: u64, last_update_ms: u64, sent_since: u64, members: usize) -> bool {
    let age = now_ms.saturating_sub(last_update_ms);
    if sent_since >= UPDATE_AFTER_MESSAGES_ANY_SIZE {
        return true;
    }
    if members > LARGE_GROUP_MEMBERS {
        age >= LARGE_GROUP_PERIOD_MS || (sent_since >= UPDATE_AFTER_MESSAGES && age >= DAY_MS)
    } else {
        sent_since >= UPDATE_AFTER_MESSAGES || age >= UPDATE_PERIOD_MS
    }
}

/// Whether a member last seen committing at `last_ms` is stale at `now_ms`.
pub fn is_stale(now_ms: u64, last_ms: u64) -> bool {
    now_ms.saturating_sub(last_ms) >= STALE_AFTER_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn small_conversations_update_after_100_messages_or_a_day() {
        assert!(!update_due(NOW, NOW - 1000, 0, 2));
        assert!(!update_due(NOW, NOW - 1000, 99, 2));
        assert!(update_due(NOW, NOW - 1000, 100, 2));
        assert!(!update_due(NOW, NOW - DAY_MS + 1, 0, 2));
        assert!(update_due(NOW, NOW - DAY_MS, 0, 2));
        assert!(update_due(NOW, 0, 0, 2), "never updated: due at once");
        assert!(update_due(NOW, NOW - 1000, 0, 100) == update_due(NOW, NOW - 1000, 0, 2));
    }

    #[test]
    fn large_groups_update_weekly_and_at_most_daily() {
        let big = LARGE_GROUP_MEMBERS + 1;
        assert!(!update_due(NOW, NOW - DAY_MS, 0, big));
        assert!(!update_due(NOW, NOW - 6 * DAY_MS, 0, big));
        assert!(update_due(NOW, NOW - 7 * DAY_MS, 0, big));
        assert!(!update_due(NOW, NOW - 1000, 499, big), "at most once a day");
        assert!(update_due(NOW, NOW - DAY_MS, 100, big));
    }

    /// Receipts skip other members' generations: an update resets them
    /// before a member could have missed the 1,024 an MLS receiver accepts.
    #[test]
    fn any_conversation_updates_after_500_messages_even_twice_a_day() {
        for members in [2, LARGE_GROUP_MEMBERS + 1, 10_000] {
            assert!(update_due(NOW, NOW - 1000, UPDATE_AFTER_MESSAGES_ANY_SIZE, members), "{members} members");
        }
        const { assert!(RECEIPTS_STOP_AFTER_MESSAGES > UPDATE_AFTER_MESSAGES_ANY_SIZE) };
        const { assert!(RECEIPTS_STOP_AFTER_MESSAGES < 1024) };
    }

    /// `update_keys_where` skips loading a group when a tiny one would not
    /// be due: that is right only while larger groups are never more eager.
    #[test]
    fn larger_groups_are_never_due_when_small_ones_are_not() {
        for age in [0, DAY_MS / 2, DAY_MS, 3 * DAY_MS, 7 * DAY_MS, 30 * DAY_MS] {
            for sent in [0, 50, 100, 1000] {
                for members in [0, 2, 100, 101, 10_000] {
                    if update_due(NOW, NOW - age, sent, members) {
                        assert!(update_due(NOW, NOW - age, sent, 0), "age {age} sent {sent} members {members}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_clock_that_went_back_never_triggers_and_staleness_is_30_days() {
        assert!(!update_due(NOW, NOW + DAY_MS, 0, 2));
        assert!(!is_stale(NOW, NOW - 29 * DAY_MS));
        assert!(is_stale(NOW, NOW - 30 * DAY_MS));
        assert!(!is_stale(NOW, NOW + 5));
    }
}
