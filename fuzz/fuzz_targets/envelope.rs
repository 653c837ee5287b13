#![no_main]
//! The messenger's envelope (what a 1:1 message carries inside the end-to-end seal),
//! the member cards and address bindings inside it, and pasted text invites. Any bytes
//! either fail to decode or decode to something that re-encodes to itself.
use libfuzzer_sys::fuzz_target;
use shoal_client::messenger::{Envelope, Recipient, invite_from_text, invite_to_text};
use shoal_subnet::{AddressBinding, MemberCard};

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode(data) {
        let again = Envelope::decode(&env.encode()).expect("an envelope's own encoding decodes");
        assert!(again == env, "envelope re-encodes differently");
        match &env {
            Envelope::Direct(d) => {
                let _ = MemberCard::parse(&d.card);
                let to = Recipient {
                    identity_key: [7; 32],
                    subnet: [8; 32],
                };
                let _ = d.verify(&[9; 32], &to);
            }
            Envelope::Invite(i) => {
                let _ = MemberCard::parse(&i.card);
                let text = invite_to_text(i);
                let back = invite_from_text(&text).expect("an invite's own text parses");
                assert!(back == *i);
            }
            Envelope::Mls(_) | Envelope::Policy(_) => {}
        }
    }
    if let Ok(card) = MemberCard::parse(data) {
        let again = MemberCard::parse(&card.to_bytes()).expect("a card's own bytes parse");
        assert!(again == card, "member card re-encodes differently");
    }
    let _ = AddressBinding::verify(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = invite_from_text(text);
    }
});
