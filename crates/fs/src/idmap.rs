//! Mapping between the guest's user and group ids and the host's, in the
//! shape of one line of a user namespace's `uid_map`: `count` ids from
//! `guest` in the guest are `count` ids from `host` on the host.
//!
//! Requests run with the host ids their guest ids map to; attributes the
//! guest reads show host owners mapped back. An id outside the range is
//! the overflow id 65534 in the other direction, as in a user namespace,
//! so an unmapped guest user can never act as a host user it was not
//! given.

/// The id an unmapped user or group becomes (`nobody` / `nogroup`).
pub const OVERFLOW_ID: u32 = 65534;

/// `count` consecutive ids starting at `guest` inside the guest and at
/// `host` on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    /// First id in the guest.
    pub guest: u32,
    /// First id on the host.
    pub host: u32,
    /// How many ids the range holds (at least 1).
    pub count: u32,
}

/// Why an [`IdRange`] cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdMapError {
    /// The range is empty.
    #[error("an id range must hold at least one id")]
    Empty,
    /// `guest + count` or `host + count` passes `u32::MAX`.
    #[error("id range {guest}/{host} of {count} ids passes the largest id")]
    Overflow {
        /// First guest id.
        guest: u32,
        /// First host id.
        host: u32,
        /// Ids in the range.
        count: u32,
    },
}

impl IdRange {
    /// Check that the range is non-empty and does not wrap.
    pub fn validate(&self) -> Result<(), IdMapError> {
        if self.count == 0 {
            return Err(IdMapError::Empty);
        }
        let overflow = IdMapError::Overflow {
            guest: self.guest,
            host: self.host,
            count: self.count,
        };
        // The last id of the range is `start + count - 1`.
        self.guest
            .checked_add(self.count - 1)
            .and(self.host.checked_add(self.count - 1))
            .map(|_| ())
            .ok_or(overflow)
    }

    fn to_host(self, id: u32) -> u32 {
        match id.checked_sub(self.guest) {
            Some(offset) if offset < self.count => self.host + offset,
            _ => OVERFLOW_ID,
        }
    }

    fn to_guest(self, id: u32) -> u32 {
        match id.checked_sub(self.host) {
            Some(offset) if offset < self.count => self.guest + offset,
            _ => OVERFLOW_ID,
        }
    }
}

/// User and group mappings of a share; `None` is the identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdMap {
    /// User ids.
    pub uids: Option<IdRange>,
    /// Group ids.
    pub gids: Option<IdRange>,
}

impl IdMap {
    /// Check both ranges.
    pub fn validate(&self) -> Result<(), IdMapError> {
        self.uids
            .iter()
            .chain(&self.gids)
            .try_for_each(|r| r.validate())
    }

    /// The host user a guest user acts as.
    pub fn uid_to_host(&self, uid: u32) -> u32 {
        self.uids.map_or(uid, |r| r.to_host(uid))
    }

    /// The host group a guest group acts as.
    pub fn gid_to_host(&self, gid: u32) -> u32 {
        self.gids.map_or(gid, |r| r.to_host(gid))
    }

    /// The guest user a host owner is shown as.
    pub fn uid_to_guest(&self, uid: u32) -> u32 {
        self.uids.map_or(uid, |r| r.to_guest(uid))
    }

    /// The guest group a host group owner is shown as.
    pub fn gid_to_guest(&self, gid: u32) -> u32 {
        self.gids.map_or(gid, |r| r.to_guest(gid))
    }

    /// Whether both directions are the identity.
    pub fn is_identity(&self) -> bool {
        self.uids.is_none() && self.gids.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_maps_inside_and_overflows_outside_both_ways() {
        let map = IdMap {
            uids: Some(IdRange {
                guest: 0,
                host: 100_000,
                count: 1000,
            }),
            gids: None,
        };
        assert_eq!(map.uid_to_host(0), 100_000);
        assert_eq!(map.uid_to_host(999), 100_999);
        assert_eq!(map.uid_to_host(1000), OVERFLOW_ID);
        assert_eq!(map.uid_to_guest(100_500), 500);
        assert_eq!(map.uid_to_guest(0), OVERFLOW_ID);
        assert_eq!(map.uid_to_guest(99_999), OVERFLOW_ID);
        // Groups are not mapped.
        assert_eq!(map.gid_to_host(5), 5);
        assert_eq!(map.gid_to_guest(5), 5);
    }

    #[test]
    fn validate_refuses_empty_and_wrapping_ranges() {
        let empty = IdRange {
            guest: 0,
            host: 0,
            count: 0,
        };
        assert_eq!(empty.validate(), Err(IdMapError::Empty));
        let wraps = IdRange {
            guest: 0,
            host: u32::MAX,
            count: 2,
        };
        assert!(matches!(wraps.validate(), Err(IdMapError::Overflow { .. })));
        let top = IdRange {
            guest: u32::MAX,
            host: u32::MAX,
            count: 1,
        };
        assert_eq!(top.validate(), Ok(()));
        assert_eq!(top.to_host(u32::MAX), u32::MAX);
    }
}
