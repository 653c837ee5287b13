//! Draws a [`ChatState`]: conversation list (left), messages (right), compose line and
//! status (bottom). Nothing but the state goes in, so tests render into a buffer.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, List, ListItem, ListState, Paragraph, Wrap};

use super::state::{ChatMessage, ChatState, ConvKey, human_secs};

pub fn render(state: &ChatState, frame: &mut Frame<'_>) {
    let [main, compose, status] = Layout::vertical([
        Constraint::Min(3),
        Constraint::Length(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let [list, messages] =
        Layout::horizontal([Constraint::Length(26), Constraint::Min(20)]).areas(main);
    render_list(state, frame, list);
    render_messages(state, frame, messages);

    let options = format!(
        " {} · delete after {}{} ",
        if state.online { "online" } else { "offline" },
        human_secs(state.ttl_secs),
        if state.burn_on_read {
            " · burn on read"
        } else {
            ""
        }
    );
    // Keep the end of a long line (a pasted card) in view.
    let width = compose.width.saturating_sub(2) as usize;
    let shown: String = {
        let n = state.input.chars().count();
        state
            .input
            .chars()
            .skip(n.saturating_sub(width.max(1) - 1))
            .collect()
    };
    frame.render_widget(
        Paragraph::new(shown).block(Block::bordered().title(" message ").title_bottom(options)),
        compose,
    );
    frame.render_widget(Paragraph::new(state.status.as_str()), status);
}

fn render_list(state: &ChatState, frame: &mut Frame<'_>, area: Rect) {
    let items: Vec<ListItem<'_>> = state
        .conversations
        .iter()
        .map(|c| {
            let mark = match c.key {
                ConvKey::Group(_) => "#",
                ConvKey::Direct(_) => "@",
            };
            let unread = if c.unread > 0 {
                format!(" ({})", c.unread)
            } else {
                String::new()
            };
            ListItem::new(format!("{mark} {}{unread}", c.title))
        })
        .collect();
    let mut list_state = ListState::default().with_selected(Some(state.selected));
    frame.render_stateful_widget(
        List::new(items)
            .block(Block::bordered().title(format!(" {} ", state.me)))
            .highlight_style(Style::new().add_modifier(Modifier::REVERSED)),
        area,
        &mut list_state,
    );
}

fn render_messages(state: &ChatState, frame: &mut Frame<'_>, area: Rect) {
    let Some(conv) = state.current() else {
        frame.render_widget(
            Paragraph::new("No conversations yet. Paste a contact's card with /add CARD, or make a group with /group new NAME. /card shows yours.")
                .wrap(Wrap { trim: true })
                .block(Block::bordered()),
            area,
        );
        return;
    };
    let title = if conv.members.is_empty() {
        format!(" {} ", conv.title)
    } else {
        format!(" {} — with {} ", conv.title, conv.members.join(", "))
    };
    let width = area.width.saturating_sub(2).max(1) as usize;
    let height = area.height.saturating_sub(2) as usize;
    // Newest at the bottom: take from the end what fits.
    let mut lines: Vec<Line<'_>> = Vec::new();
    let mut used = 0;
    for m in conv.messages.iter().rev() {
        let line = message_line(m);
        let rows = line.width().div_ceil(width).max(1);
        if used + rows > height && !lines.is_empty() {
            break;
        }
        used += rows;
        lines.push(line);
    }
    lines.reverse();
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(title)),
        area,
    );
}

fn message_line(m: &ChatMessage) -> Line<'static> {
    let mut spans = vec![
        Span::raw(format!("{} ", clock(m.at_unix_ms))),
        Span::styled(
            format!("{}: ", m.from),
            Style::new().add_modifier(Modifier::BOLD),
        ),
        Span::raw(m.body.clone()),
    ];
    let mut marks = Vec::new();
    if let Some((_, d)) = m.own {
        marks.push(d.label().to_string());
    }
    if m.expires_unix_ms != u64::MAX && m.at_unix_ms > 0 {
        let ttl = m.expires_unix_ms.saturating_sub(m.at_unix_ms) / 1000;
        marks.push(format!("ttl {}", human_secs(ttl)));
    }
    if m.burn_on_read {
        marks.push("burn".into());
    }
    if !marks.is_empty() {
        spans.push(Span::styled(
            format!("  [{}]", marks.join(" · ")),
            Style::new().add_modifier(Modifier::DIM),
        ));
    }
    Line::from(spans)
}

/// HH:MM (UTC) of a unix time in ms; "--:--" before the clock stamped it.
fn clock(ms: u64) -> String {
    if ms == 0 {
        return "--:--".into();
    }
    let mins = ms / 60_000;
    format!("{:02}:{:02}", (mins / 60) % 24, mins % 60)
}

#[cfg(test)]
mod tests {
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::*;
    use crate::chat::state::{Delivery, Key, Update};

    fn screen(state: &ChatState) -> String {
        let mut t = Terminal::new(TestBackend::new(100, 20)).unwrap();
        t.draw(|f| render(state, f)).unwrap();
        let buf = t.backend().buffer();
        let mut out = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                out.push_str(buf[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    #[test]
    fn shows_list_unread_marks_and_delivery() {
        let mut s = ChatState::new("alice".into());
        s.apply(Update::Conversation {
            key: ConvKey::Group(vec![1]),
            title: "friends".into(),
            members: vec!["bob".into()],
        });
        s.apply(Update::Conversation {
            key: ConvKey::Direct("carol".into()),
            title: "carol".into(),
            members: vec![],
        });
        s.apply(Update::Received {
            conv: ConvKey::Direct("carol".into()),
            from: "carol".into(),
            body: "psst".into(),
            at_unix_ms: 3_600_000,
            expires_unix_ms: 3_660_000,
            burn_on_read: true,
        });
        for c in "see you at 6".chars() {
            s.on_key(Key::Char(c));
        }
        s.on_key(Key::Enter);
        s.stamp_own(1, 7_200_000, 3600);
        s.apply(Update::Delivery {
            local_id: 1,
            delivery: Delivery::Acked,
        });
        let text = screen(&s);
        assert!(text.contains("# friends"), "{text}");
        assert!(text.contains("@ carol (1)"), "{text}");
        assert!(text.contains("with bob"), "{text}");
        assert!(
            text.contains("02:00 alice: see you at 6  [delivered · ttl 60m]"),
            "{text}"
        );
        assert!(text.contains("offline"), "{text}");
        s.on_key(Key::Tab);
        let text = screen(&s);
        assert!(
            text.contains("01:00 carol: psst  [ttl 60s · burn]"),
            "{text}"
        );
        assert!(text.contains("@ carol "), "{text}");
        assert!(!text.contains("(1)"), "{text}");
    }

    #[test]
    fn empty_and_long_input() {
        let mut s = ChatState::new("alice".into());
        assert!(screen(&s).contains("No conversations yet"));
        s.on_key(Key::Paste(format!("/add {}END", "x".repeat(500))));
        assert!(screen(&s).contains("xxxEND"));
    }
}
