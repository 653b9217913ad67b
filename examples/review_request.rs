//! The Rust half of README "A Rust agent and a Python script on one bus": it asks for
//! a review on the bus, and as the agent, that the environment names.

use agentbus::{Bus, GroupOptions, NewMessage};

fn main() -> agentbus::Result<()> {
    // AGENTBUS_DIR=/srv/book/.agentbus AGENTBUS_AGENT=writer ./review_request
    let bus = Bus::from_env()?;
    let reviews = bus.create_or_open_mailbox("reviews")?;
    reviews.create_or_open_group("reviewers", GroupOptions::new())?;
    reviews.send(NewMessage::new("review.request").subject("chapter 3"))?;
    Ok(())
}
