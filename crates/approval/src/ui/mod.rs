//! The local approval page and its JSON API: see [`server`] for the routes and defences.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use vmcp_approval::{Broker, BrokerConfig};
//! let broker = Broker::new(BrokerConfig::default());
//! let ui = vmcp_approval::ui::ApprovalUi::start("127.0.0.1:0".parse()?, broker.clone()).await?;
//! eprintln!("approvals: {}", ui.url());
//! # Ok(()) }
//! ```

mod page;
pub mod server;

pub use server::{ApprovalUi, UiError, MAX_BODY, MAX_CONNECTIONS};
