#![no_main]
//! Pasted contact cards: any text either fails to parse or round-trips.
use libfuzzer_sys::fuzz_target;
use shoal_client::ContactCard;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(card) = ContactCard::parse(text) {
        let again = ContactCard::parse(&card.to_text()).expect("a card's own text parses");
        assert!(again.contact == card.contact);
    }
});
