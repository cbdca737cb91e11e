//! Property tests: parsers never panic and round-trip; tokens never verify after any change.

use proptest::prelude::*;
use routing_core::{CausalToken, Lsn, MAX_TOKEN_TEXT, TokenCodec, TokenKey};

fn codec() -> TokenCodec {
    TokenCodec::new(TokenKey::new(3, "property-key-0123456789").expect("key"))
}

proptest! {
    #[test]
    fn lsn_text_round_trips(v in any::<u64>()) {
        let l = Lsn(v);
        prop_assert_eq!(l.to_string().parse::<Lsn>().expect("own output parses"), l);
    }

    #[test]
    fn lsn_parser_never_panics(s in ".{0,40}") {
        let _ = s.parse::<Lsn>();
    }

    #[test]
    fn lsn_order_matches_numbers(a in any::<u64>(), b in any::<u64>()) {
        prop_assert_eq!(Lsn(a).cmp(&Lsn(b)), a.cmp(&b));
        prop_assert_eq!(Lsn(a).bytes_after(Lsn(b)), a.saturating_sub(b));
    }

    #[test]
    fn tokens_round_trip(lsn in any::<u64>(), timeline in any::<u32>(), system_id in any::<u64>()) {
        let t = CausalToken { lsn: Lsn(lsn), timeline, system_id };
        prop_assert_eq!(codec().verify(&codec().sign(&t)), Ok(t));
    }

    #[test]
    fn token_verify_never_panics_and_rejects_junk(s in "[A-Za-z0-9_-]{0,80}") {
        // Random base64url text of any length is (overwhelmingly) not a valid token.
        prop_assert!(codec().verify(&s).is_err());
    }

    #[test]
    fn any_character_change_breaks_a_token(lsn in any::<u64>(), pos in 0usize..MAX_TOKEN_TEXT, c in "[A-Za-z0-9_-]") {
        let text = codec().sign(&CausalToken { lsn: Lsn(lsn), timeline: 1, system_id: 9 });
        let mut chars: Vec<char> = text.chars().collect();
        let new = c.chars().next().expect("one char");
        prop_assume!(chars[pos] != new);
        chars[pos] = new;
        let forged: String = chars.into_iter().collect();
        prop_assert!(codec().verify(&forged).is_err());
    }
}
