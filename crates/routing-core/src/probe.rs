//! Parsing the monitor's probe answer (see [`crate::backend::sql::PROBE`]).

use std::time::Duration;

use crate::Lsn;

/// One node's state as one probe saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeReport {
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// Replay LSN on a replica, current WAL LSN on a primary.
    pub lsn: Option<Lsn>,
    /// Receive LSN (replicas).
    pub receive_lsn: Option<Lsn>,
    /// Time since the last replayed transaction committed on the primary (replicas).
    pub replay_age: Option<Duration>,
    /// Timeline: the primary's insert timeline, or the one a replica receives.
    pub timeline: Option<u32>,
    /// `pg_control_system().system_identifier`.
    pub system_id: Option<u64>,
    /// `pg_postmaster_start_time()` in microseconds since the Unix epoch: which server instance
    /// answered (a restart, or another server behind a stable endpoint, changes it).
    pub started: Option<u64>,
}

/// The probe answer did not have the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected probe answer {0:?}")]
pub struct ProbeParseError(pub String);

impl ProbeReport {
    /// Parses `"<t|f> <lsn|-> <lsn|-> <ms|-> <tli|walfile-prefix|-> <sysid|-> [<started-us|->]"`
    /// (the start time is optional, for probes that do not report it).
    pub fn parse(text: &str) -> Result<ProbeReport, ProbeParseError> {
        let err = || ProbeParseError(text.chars().take(200).collect());
        let fields: Vec<&str> = text.split(' ').collect();
        if !(6..=7).contains(&fields.len()) {
            return Err(err());
        }
        fn opt(s: &str) -> Option<&str> {
            if s == "-" { None } else { Some(s) }
        }
        let in_recovery = match fields[0] {
            "true" | "t" => true,
            "false" | "f" => false,
            _ => return Err(err()),
        };
        let lsn = |s: &str| {
            opt(s)
                .map(|v| v.parse::<Lsn>().map_err(|_| err()))
                .transpose()
        };
        let replay_age = opt(fields[3])
            .map(|v| {
                v.parse::<i64>()
                    .map(|ms| Duration::from_millis(ms.max(0).unsigned_abs()))
                    .map_err(|_| err())
            })
            .transpose()?;
        // A primary reports the first 8 hex digits of its WAL file name (the timeline); a replica
        // reports the decimal timeline it receives.
        let timeline = match opt(fields[4]) {
            None => None,
            Some(v) if !in_recovery => Some(u32::from_str_radix(v, 16).map_err(|_| err())?),
            Some(v) => Some(v.parse::<u32>().map_err(|_| err())?),
        };
        let system_id = opt(fields[5])
            .map(|v| v.parse::<u64>().map_err(|_| err()))
            .transpose()?;
        let started = fields
            .get(6)
            .and_then(|f| opt(f))
            .map(|v| v.parse::<u64>().map_err(|_| err()))
            .transpose()?;
        Ok(ProbeReport {
            in_recovery,
            lsn: lsn(fields[1])?,
            receive_lsn: lsn(fields[2])?,
            replay_age,
            timeline,
            system_id,
            started,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_primary_and_replica_answers() {
        let p = ProbeReport::parse("false 0/3000148 - - 00000002 7312345678901234567")
            .expect("primary");
        assert!(!p.in_recovery);
        assert_eq!(p.lsn, Some(Lsn(0x300_0148)));
        assert_eq!(p.timeline, Some(2));
        assert_eq!(p.system_id, Some(7_312_345_678_901_234_567));
        let r = ProbeReport::parse("true 0/3000100 0/3000148 12 2 7312345678901234567")
            .expect("replica");
        assert!(r.in_recovery);
        assert_eq!(r.replay_age, Some(Duration::from_millis(12)));
        assert_eq!(r.timeline, Some(2));
        assert_eq!(r.started, None, "six fields: no start time");
        let odd = ProbeReport::parse("true - - - - -").expect("fresh replica");
        assert_eq!(odd.lsn, None);
        let s = ProbeReport::parse("false 0/3000148 - - 00000002 73 1717000000123456")
            .expect("with the start time");
        assert_eq!(s.started, Some(1_717_000_000_123_456));
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "",
            "true",
            "maybe 0/1 - - 1 1",
            "true 0/1 - - 1",
            "true zz - - 1 1",
            "false 0/1 - - XYZ 1",
            "false 0/1 - - 1 1 soon",
            "false 0/1 - - 1 1 1 1",
        ] {
            assert!(ProbeReport::parse(bad).is_err(), "{bad:?}");
        }
    }
}
