//! Where a watch of a merchant's entries stands: a position in commit order,
//! written to the wire as an opaque cursor.
//!
//! Commit order is what a follower needs: an entry appears only once every
//! entry before it in that order is committed, so a reader resuming after a
//! position can never miss one committed later "behind" it.
//!
//! - PostgreSQL: the id of the transaction that booked the entry, then the
//!   entry's id. The store reads only entries of transactions older than the
//!   oldest transaction still running, so nothing can later commit below
//!   what it has handed out.
//! - SQLite: a position assigned at insert; its single writer commits in
//!   position order.

use std::fmt;

/// A position in a ledger's commit order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchCursor {
    /// PostgreSQL: (booking transaction, entry id); the start is (0, "").
    Transaction {
        /// The `xid8` of the transaction that booked the entry.
        xid: u64,
        /// The entry's id; empty before the first entry of `xid`.
        id: String,
    },
    /// SQLite: the entry's position; the start is 0.
    Position(i64),
}

/// A cursor fluxo did not issue, or issued by a ledger on the other backend.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a watch cursor issued by this ledger (send the cursor of a WatchEntriesResponse unchanged)")]
pub struct CursorError;

impl WatchCursor {
    /// The wire form: `t<xid>.<id>` or `p<position>`.
    pub fn encode(&self) -> String {
        self.to_string()
    }

    /// The cursor `s` encodes.
    pub fn parse(s: &str) -> Result<Self, CursorError> {
        if let Some(rest) = s.strip_prefix('t') {
            let (xid, id) = rest.split_once('.').ok_or(CursorError)?;
            let xid = digits(xid)?;
            // An entry id is a ULID: 26 of Crockford's base32 digits.
            if !(id.is_empty() || (id.len() == 26 && id.bytes().all(|b| b.is_ascii_alphanumeric()))) {
                return Err(CursorError);
            }
            return Ok(Self::Transaction { xid, id: id.to_owned() });
        }
        if let Some(rest) = s.strip_prefix('p') {
            let position = i64::try_from(digits(rest)?).map_err(|_| CursorError)?;
            return Ok(Self::Position(position));
        }
        Err(CursorError)
    }
}

/// A decimal without sign or leading zeros (but "0"), as `encode` writes it.
fn digits(s: &str) -> Result<u64, CursorError> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if !canonical {
        return Err(CursorError);
    }
    s.parse().map_err(|_| CursorError)
}

impl fmt::Display for WatchCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transaction { xid, id } => write!(f, "t{xid}.{id}"),
            Self::Position(position) => write!(f, "p{position}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{CursorError, WatchCursor};

    #[test]
    fn cursors_survive_the_wire() {
        for cursor in [
            WatchCursor::Transaction { xid: 0, id: String::new() },
            WatchCursor::Transaction { xid: u64::MAX, id: "01KBNZ7Q3X5V0000000000000A".into() },
            WatchCursor::Position(0),
            WatchCursor::Position(i64::MAX),
        ] {
            assert_eq!(WatchCursor::parse(&cursor.encode()), Ok(cursor));
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "t",
            "t1",
            "t.",
            "t-1.",
            "t01.",
            "t1.short",
            "t1.01KBNZ7Q3X5V0000000000000A.",
            "p",
            "p-1",
            "p01",
            "p9223372036854775808",
            "t18446744073709551616.",
            "x1",
            " p1",
            "p1 ",
        ] {
            assert_eq!(WatchCursor::parse(bad), Err(CursorError), "{bad:?}");
        }
    }
}
