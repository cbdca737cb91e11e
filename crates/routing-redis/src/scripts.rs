//! The two Lua scripts. Each runs atomically on the server and costs one round trip (EVALSHA;
//! `redis::Script` loads it again by itself after a restart or `SCRIPT FLUSH`).
//!
//! Values are the LSN as 16 lowercase hex digits. Lua numbers are doubles, so a u64 cannot be
//! compared as one number: the scripts compare the two 32-bit halves (exact in a double), which
//! is also independent of the server's collation locale.
//!
//! The epoch key holds the server time (ms) at which the current data set was first seen without
//! one: see "Redis restarts" in the crate docs.

use std::sync::LazyLock;

use redis::Script;

/// Source of the lookup script.
///
/// `KEYS[1]` mark, `KEYS[2]` epoch. Returns `{value or '', pttl, epoch age in ms, 1 if the epoch
/// was created by this call}`. A user with a mark (the read path of read-your-writes after a
/// write) costs two reads and nothing else: the epoch only matters when there is no mark (a mark
/// that is there is the user's latest write whatever Redis lost before), so its age is
/// returned as 0 then and the epoch key is not looked at.
pub(crate) const GET: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local v = redis.call('GET', KEYS[1])
if v then return {v, redis.call('PTTL', KEYS[1]), 0, 0} end
local pttl = -2
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local born = tonumber(redis.call('GET', KEYS[2]) or '')
local fresh = 0
if not born then
  redis.call('SET', KEYS[2], string.format('%.0f', now))
  born = now
  fresh = 1
end
local age = now - born
if age < 0 then age = 0 end
return {v or '', pttl, age, fresh}
";

/// Source of the max-merge script.
///
/// `KEYS[1]` mark, `KEYS[2]` epoch; `ARGV[1]` the LSN as 16 lowercase hex digits, `ARGV[2]` the
/// TTL in ms. Keeps the larger of the stored and the given LSN (a malformed stored value is
/// replaced), restarts the TTL, creates the epoch key if missing. Returns `{kept value, 1 if the
/// epoch was created by this call}`.
pub(crate) const SET_MAX: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local function valid(s)
  return type(s) == 'string' and string.len(s) == 16 and string.find(s, '^[0-9a-f]+$') ~= nil
end
local function above(a, b)
  local ah = tonumber(string.sub(a, 1, 8), 16)
  local bh = tonumber(string.sub(b, 1, 8), 16)
  if ah ~= bh then return ah > bh end
  return tonumber(string.sub(a, 9, 16), 16) > tonumber(string.sub(b, 9, 16), 16)
end
local keep = ARGV[1]
local cur = redis.call('GET', KEYS[1])
if valid(cur) and above(cur, keep) then keep = cur end
redis.call('SET', KEYS[1], keep, 'PX', ARGV[2])
local fresh = 0
if redis.call('EXISTS', KEYS[2]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)))
  fresh = 1
end
return {keep, fresh}
";

pub(crate) static GET_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(GET));
pub(crate) static SET_MAX_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SET_MAX));

/// The stored form of an LSN.
pub(crate) fn encode(lsn: u64) -> String {
    format!("{lsn:016x}")
}

/// Parses the stored form; `None` for anything else (for example a TTL-only writer's `"1"`).
pub(crate) fn decode(s: &[u8]) -> Option<u64> {
    if s.len() != 16 || !s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_rejects_junk() {
        for v in [0, 1, 0xFFFF_FFFF, 0x1_0000_0000, u64::MAX, 0x16_B374_D848] {
            assert_eq!(decode(encode(v).as_bytes()), Some(v));
        }
        for junk in [
            &b"1"[..],
            b"",
            b"000000000000000G",
            b"000000000000000A",
            b"+00000000000000a",
        ] {
            assert_eq!(decode(junk), None, "{junk:?}");
        }
    }
}
