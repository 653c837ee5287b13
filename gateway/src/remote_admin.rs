//! Admin-signed subnet commands over the network, both ends.
//!
//! The admin dials the gateway's client endpoint with its subnet key as the link
//! identity, sends one signed command as fixed-size `AdminChunk` frames and reads one
//! `AdminResult` frame ([`execute`]). The gateway accepts such a link only from the admin
//! key of a subnet in its config, checks the command's signature (and, for a policy, the
//! policy's signature) off the mailbox task with [`check_command`], and hands the
//! resulting [`CheckedAdmin`] to [`crate::Mailbox::apply_admin`], which checks target,
//! expiry and sequence against the persisted guard and applies it. The answer goes out
//! only after the store reports the batch durable.

use std::net::SocketAddr;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use shoal_link::{LinkEndpoint, NodeKey, PeerSet};
use shoal_packet::{FRAME_SIZE, Frame};
use shoal_subnet::{
    AccountAction, Policy, SignedCheckedCommand, SignedCommand, SubnetError, SubnetId,
    UncheckedCommand, UncheckedPolicy,
};

use crate::GatewayError;
use crate::protocol::{AdminRefusal, GatewayMsg, admin_chunks};

/// A command whose admin signature verified against a hosted subnet (and whose policy,
/// if it carries one, verified against the same subnet). Freshness and replay are
/// checked when the mailbox core applies it.
#[derive(Debug, Clone)]
pub struct CheckedAdmin {
    pub(crate) command: SignedCheckedCommand,
    pub(crate) policy: Option<Policy>,
}

impl CheckedAdmin {
    pub fn subnet(&self) -> SubnetId {
        self.command.subnet()
    }
}

/// A refused command: the cause (for the answer and `/metrics`) and a short message
/// without keys or addresses.
pub type Refusal = (AdminRefusal, &'static str);

/// Parses `bytes` as a signed command and checks its signature against the `hosted`
/// subnets. Public-key work: the driver runs it on the admin link's task.
pub fn check_command(bytes: &[u8], hosted: &[SubnetId]) -> Result<CheckedAdmin, Refusal> {
    let unchecked = UncheckedCommand::parse(bytes)
        .map_err(|_| (AdminRefusal::Malformed, "command does not parse"))?;
    let command = unchecked.check_signature(hosted).map_err(|e| match e {
        SubnetError::WrongSubnet { .. } => (
            AdminRefusal::UnknownSubnet,
            "command is from a subnet this gateway does not host",
        ),
        _ => (
            AdminRefusal::BadSignature,
            "command signature does not verify",
        ),
    })?;
    let policy = match command.action() {
        AccountAction::PublishPolicy { policy } => {
            let parsed = UncheckedPolicy::parse(policy.as_bytes())
                .map_err(|_| (AdminRefusal::Malformed, "policy does not parse"))?;
            Some(
                parsed
                    .check_signature(&command.subnet())
                    .map_err(|e| match e {
                        SubnetError::WrongSubnet { .. } => (
                            AdminRefusal::Rejected,
                            "policy is of another subnet than the command",
                        ),
                        _ => (
                            AdminRefusal::BadSignature,
                            "policy signature does not verify",
                        ),
                    })?,
            )
        }
        _ => None,
    };
    Ok(CheckedAdmin { command, policy })
}

/// Sends `command` to the gateway at `gateway_addr` (its client endpoint, pinned to
/// `gateway_key`) over a link authenticated by `admin`, and waits for the answer.
///
/// `Ok(())` only once the gateway has applied the command and made it durable.
/// A refusal is [`GatewayError::AdminRefused`] (nothing changed); a link failure or
/// `timeout` is [`GatewayError::AdminLink`] (the command may or may not have been
/// applied; re-sending it is safe, a replay is refused).
pub async fn execute(
    admin: &SigningKey,
    gateway_addr: SocketAddr,
    gateway_key: NodeKey,
    command: &SignedCommand,
    timeout: Duration,
) -> Result<(), GatewayError> {
    let chunks = admin_chunks(&command.to_bytes())?;
    let mut frames = Vec::with_capacity(chunks.len());
    for c in &chunks {
        frames.push(c.to_frame()?);
    }
    let bind = if gateway_addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let link_err = |what: &'static str, e: &dyn std::fmt::Display| GatewayError::AdminLink {
        detail: format!("{what}: {e}"),
    };
    let endpoint =
        LinkEndpoint::bind(bind, admin, PeerSet::new()).map_err(|e| link_err("bind", &e))?;
    let exchange = async {
        let link = endpoint
            .connect(gateway_addr, gateway_key)
            .await
            .map_err(|e| link_err("connect", &e))?;
        let mut tx = link
            .open_frames(FRAME_SIZE)
            .await
            .map_err(|e| link_err("open stream", &e))?;
        for f in &frames {
            tx.send(f.as_bytes())
                .await
                .map_err(|e| link_err("send", &e))?;
        }
        let mut rx = link
            .accept_frames(FRAME_SIZE)
            .await
            .map_err(|e| link_err("gateway stream", &e))?;
        let answer = loop {
            let bytes = rx
                .recv()
                .await
                .map_err(|e| link_err("read", &e))?
                .ok_or_else(|| GatewayError::AdminLink {
                    detail: "gateway closed the link without answering".into(),
                })?;
            let msg = Frame::decode(bytes)
                .map_err(GatewayError::Frame)
                .and_then(|f| GatewayMsg::from_frame(&f))?;
            match msg {
                GatewayMsg::AdminResult { refusal, message } => break (refusal, message),
                GatewayMsg::Error { code, message } => {
                    let refusal = if code == crate::ErrorCode::Unauthenticated {
                        AdminRefusal::NotAdmin
                    } else {
                        AdminRefusal::Internal
                    };
                    break (Some(refusal), message);
                }
                // Nothing else is sent on an admin link; skip rather than guess.
                _ => continue,
            }
        };
        let _ = tx.finish();
        link.close();
        Ok::<_, GatewayError>(answer)
    };
    let result = tokio::time::timeout(timeout, exchange).await;
    endpoint.close();
    match result {
        Err(_) => Err(GatewayError::AdminLink {
            detail: format!("no answer within {timeout:?}"),
        }),
        Ok(Err(e)) => Err(e),
        Ok(Ok((None, _))) => Ok(()),
        Ok(Ok((Some(refusal), message))) => Err(GatewayError::AdminRefused { refusal, message }),
    }
}
