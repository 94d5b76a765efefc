//! `service add-domain`, `domain show|verify|remove`: alias domains from the command line, with
//! the records to create and, with `--wait`, each step as it happens.

use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};

use crate::admin_domains::DomainView;
use crate::client::AdminClient;
use crate::exit::{CliError, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE};

/// A domain name as one path segment: what a name may hold (U-labels included, sent
/// percent-encoded), nothing that could alter the path.
fn name_segment(name: &str) -> Result<String, CliError> {
    let bad = name.is_empty()
        || name
            .chars()
            .any(|c| c == '/' || c == '?' || c == '#' || c == '%' || c.is_whitespace());
    if bad {
        return Err(CliError::new(
            EX_USAGE,
            format!("`{name}` is not a domain name"),
        ));
    }
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'*' | b'_') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(out)
}

fn id_segment(id: &str) -> Result<&str, CliError> {
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        Ok(id)
    } else {
        Err(CliError::new(
            EX_USAGE,
            format!("`{id}` is not a service id (a UUID)"),
        ))
    }
}

fn unexpected(e: serde_json::Error) -> CliError {
    CliError::new(
        1,
        format!("the admin API answered something unexpected: {e}"),
    )
}

fn print_records(view: &DomainView) {
    let i = &view.instructions;
    let sets = [
        ("a CNAME (not at a zone apex)", &i.cname),
        (
            "or an alias-mode HTTPS record (works at an apex)",
            &i.https_alias,
        ),
        (
            "or, at an apex with A/AAAA, only the nodes' addresses and the token",
            &i.addresses_and_token,
        ),
        (
            "for a certificate before the name points here: delegate DNS-01",
            &i.acme_challenge,
        ),
    ];
    println!("  to verify it, create");
    for (title, records) in sets {
        if records.is_empty() {
            continue;
        }
        println!("    {title}:");
        for r in records.iter() {
            println!("      {} {} {}", r.name, r.rtype, r.value);
        }
    }
}

fn print_domain(view: &DomainView, with_trace: bool) {
    println!("{}", view.name);
    println!("  service      {}", view.service);
    let status = serde_json::to_value(view.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    match (view.verified_at, view.proof) {
        (Some(at), Some(proof)) if status == "verified" => {
            let proof = serde_json::to_value(proof)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            println!("  status       verified at {at} (by {proof})");
        }
        _ => println!("  status       {status}"),
    }
    if let Some(reason) = &view.reason {
        println!("  reason       {reason}");
    }
    if let Some(at) = view.failing_since {
        println!("  away since   {at} (moves once verify.grace has passed)");
    }
    match view.next_check_at {
        Some(at) => println!("  next check   {at}"),
        None if status != "verified" => {
            println!(
                "  next check   only by hand: portcullis domain verify {}",
                view.name
            )
        }
        None => {}
    }
    match &view.certificate {
        Some(c) => {
            let until = c.not_after.map_or(String::new(), |t| format!(" until {t}"));
            println!("  certificate  {}{until}", c.status);
        }
        None => println!("  certificate  none yet"),
    }
    if view.delegated {
        println!("  dns-01       _acme-challenge is delegated here");
    }
    if status != "verified" {
        print_records(view);
    }
    if with_trace && let Some(trace) = &view.trace {
        println!("  last check   {} on node {}", trace.at, trace.node);
        for step in &trace.steps {
            let records = if step.records.is_empty() {
                String::new()
            } else {
                format!(": {}", step.records.join("; "))
            };
            println!(
                "    {} {} @{} {} {}ms{records}",
                step.name, step.rtype, step.resolver, step.rcode, step.took_ms
            );
        }
        println!("    => {}", trace.verdict);
    }
}

pub async fn add(
    client: &AdminClient,
    id: &str,
    name: &str,
    wait: Option<Duration>,
    json: bool,
) -> Result<(), CliError> {
    let path = format!("/v1/services/{}/domains", id_segment(id)?);
    let value = client
        .call(Method::POST, &path, Some(json!({ "name": name })))
        .await?
        .unwrap_or(Value::Null);
    let view: DomainView = serde_json::from_value(value.clone()).map_err(unexpected)?;
    match wait {
        None if json => crate::cli::print_json(&value),
        None => {
            println!(
                "added {} to service {id}; it is verified in the background",
                view.name
            );
            print_records(&view);
            Ok(())
        }
        Some(timeout) => follow(client, &view.name, timeout, json).await,
    }
}

/// Prints each step (verifying, verified, the certificate's steps, active) until the name is
/// served with its certificate, or fails with the reason and the records to create.
async fn follow(
    client: &AdminClient,
    name: &str,
    timeout: Duration,
    json: bool,
) -> Result<(), CliError> {
    let path = format!("/v1/domains/{}", name_segment(name)?);
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let value = client
            .call(Method::GET, &path, None)
            .await?
            .unwrap_or(Value::Null);
        let view: DomainView = serde_json::from_value(value.clone()).map_err(unexpected)?;
        let status = value["status"].as_str().unwrap_or_default().to_string();
        let cert = value["certificate"]["status"].as_str().map(str::to_string);
        let step = match (status.as_str(), cert.as_deref()) {
            ("pending", _) => "verifying".to_string(),
            ("verified", None) => "verified".to_string(),
            ("verified", Some(c)) => format!("verified, certificate {c}"),
            (s, Some(c)) => format!("{s}, certificate {c}"),
            (s, None) => s.to_string(),
        };
        if step != last {
            if json {
                println!("{}", json!({ "step": step, "domain": value }));
            } else {
                println!("{step}");
            }
            last = step;
        }
        match (status.as_str(), cert.as_deref()) {
            ("verified", Some("active")) => {
                if !json {
                    println!("{name} is served with its certificate");
                }
                return Ok(());
            }
            ("verified", Some("failed")) => {
                return Err(CliError::new(
                    EX_UNAVAILABLE,
                    format!(
                        "{name} is verified but its certificate failed: {} (the node retries at {})",
                        value["certificate"]["last_error"]["detail"]
                            .as_str()
                            .unwrap_or("no reason given"),
                        value["certificate"]["next_attempt_at"]
                            .as_str()
                            .unwrap_or("a later time")
                    ),
                ));
            }
            ("failed", _) | ("moved", _) => {
                if !json {
                    print_records(&view);
                }
                return Err(CliError::new(
                    EX_UNAVAILABLE,
                    format!(
                        "{name} is {status}: {}; the node checks again at {}",
                        view.reason.as_deref().unwrap_or("no reason given"),
                        view.next_check_at
                            .map_or("no set time (check by hand)".into(), |t| t.to_string())
                    ),
                ));
            }
            _ => {}
        }
        if std::time::Instant::now() >= deadline {
            return Err(CliError::new(
                EX_TEMPFAIL,
                format!(
                    "{name} is still {last} after {} s; follow it with `portcullis domain show {name}`",
                    timeout.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks `method path` and prints the domain it answers (as JSON with `--json`); `None` when
/// printed as JSON.
async fn call_and_print(
    client: &AdminClient,
    method: Method,
    path: &str,
    json: bool,
) -> Result<Option<DomainView>, CliError> {
    let value = client
        .call(method, path, None)
        .await?
        .unwrap_or(Value::Null);
    if json {
        crate::cli::print_json(&value)?;
        return Ok(None);
    }
    let view: DomainView = serde_json::from_value(value).map_err(unexpected)?;
    print_domain(&view, true);
    Ok(Some(view))
}

pub async fn show(client: &AdminClient, name: &str, json: bool) -> Result<(), CliError> {
    let path = format!("/v1/domains/{}", name_segment(name)?);
    call_and_print(client, Method::GET, &path, json).await?;
    Ok(())
}

pub async fn verify(client: &AdminClient, name: &str, json: bool) -> Result<(), CliError> {
    let path = format!("/v1/domains/{}/verify", name_segment(name)?);
    let Some(view) = call_and_print(client, Method::POST, &path, json).await? else {
        return Ok(());
    };
    if view.status == portcullis_config::model::VerificationStatus::Verified {
        Ok(())
    } else {
        Err(CliError::new(
            EX_UNAVAILABLE,
            format!(
                "{} is not verified: {}",
                view.name,
                view.reason
                    .as_deref()
                    .unwrap_or("the check has not finished yet")
            ),
        ))
    }
}

pub async fn remove(
    client: &AdminClient,
    id: &str,
    name: &str,
    json: bool,
) -> Result<(), CliError> {
    let path = format!(
        "/v1/services/{}/domains/{}",
        id_segment(id)?,
        name_segment(name)?
    );
    client.call(Method::DELETE, &path, None).await?;
    if json {
        return crate::cli::print_json(&json!({ "removed": name, "service": id }));
    }
    println!("removed {name} from service {id}; it is no longer served");
    Ok(())
}
