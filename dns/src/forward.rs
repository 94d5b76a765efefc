//! Forwarding for the networks that use this node as their resolver: names outside our zones
//! go to the configured upstreams through hickory-resolver, whose cache holds only upstream
//! answers (authoritative data never passes through it). Everyone else gets REFUSED.

use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use ipnet::IpNet;
use portcullis_config::file::ForwardSection;

use crate::answer::CLASSIC_UDP_SIZE;

pub struct Forwarder {
    resolver: TokioResolver,
    allow_from: Vec<IpNet>,
}

impl Forwarder {
    /// `None` when no network may forward. Fails when networks are allowed but no upstream set.
    pub fn new(section: &ForwardSection) -> Result<Option<Self>, String> {
        if section.allow_from.is_empty() {
            return Ok(None);
        }
        if section.upstreams.is_empty() {
            return Err(
                "dns.forward.allow_from is set but dns.forward.upstreams is empty: \
                 list the resolvers to forward to (e.g. upstreams = [\"10.0.0.2:53\"])"
                    .into(),
            );
        }
        let servers = section
            .upstreams
            .iter()
            .map(|upstream| {
                let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                    .into_iter()
                    .map(|mut c| {
                        c.port = upstream.port();
                        c
                    })
                    .collect();
                NameServerConfig::new(upstream.ip(), true, connections)
            })
            .collect();
        let mut options = ResolverOpts::default();
        options.cache_size = section.cache_size;
        options.timeout = Duration::from_millis(section.timeout_ms.max(1));
        options.attempts = 1;
        options.use_hosts_file = ResolveHosts::Never;
        options.preserve_intermediates = true;
        options.num_concurrent_reqs = 1;
        let resolver = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(options)
        .build()
        .map_err(|e| format!("dns.forward: cannot set up the resolver: {e}"))?;
        Ok(Some(Forwarder {
            resolver,
            allow_from: section.allow_from.clone(),
        }))
    }

    pub fn allows(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.allow_from.iter().any(|n| n.contains(&client))
    }

    /// The answer to `request`'s question from upstream, as a recursive resolver sends it.
    pub async fn resolve(&self, request: &Message, query: Query, udp_payload: u16) -> Message {
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.metadata.checking_disabled = request.metadata.checking_disabled;
        response.add_query(query.clone());
        if let Some(edns) = &request.edns {
            let mut ours = Edns::new();
            ours.set_max_payload(udp_payload.max(CLASSIC_UDP_SIZE));
            ours.set_dnssec_ok(edns.flags().dnssec_ok);
            response.set_edns(ours);
        }
        match self
            .resolver
            .lookup(query.name().clone(), query.query_type())
            .await
        {
            Ok(lookup) => {
                response.answers = lookup.answers().to_vec();
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(none))) => {
                response.metadata.response_code = none.response_code;
                if let Some(soa) = none.soa {
                    response.authorities.push(soa.into_record_of_rdata());
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, name = %query.name(), "forwarded query failed");
                response.metadata.response_code = ResponseCode::ServFail;
            }
        }
        response
    }
}
