//! `strait tunnels` and `strait clients`: the Engine API inventory as a
//! table (or as JSON for scripts).

use serde_json::Value;

use crate::engine_api::{EngineApi, with_params};

/// Which inventory to show.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Tunnels,
    Clients,
}

pub async fn show(api: &EngineApi, kind: Kind, params: Option<&Value>, json: bool) -> anyhow::Result<()> {
    let path = match kind {
        Kind::Tunnels => "/api/tunnels",
        Kind::Clients => "/api/clients",
    };
    let items: Vec<Value> = api.get_json(&with_params(path, params)).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(());
    }
    print!("{}", table(kind, &items));
    Ok(())
}

fn field(item: &Value, key: &str) -> String {
    match item.get(key) {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) if s.is_empty() => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.to_string(),
        Some(other) => other.to_string(),
    }
}

/// Where the public reaches a tunnel: its hostname, or `host:port` for a
/// published tcp or udp tunnel on a port of its own.
fn address(item: &Value) -> String {
    let own_port = item.get("publish") == Some(&Value::Bool(true))
        && matches!(item.get("protocol").and_then(Value::as_str), Some("tcp" | "udp"));
    match (own_port, item.get("port").and_then(Value::as_u64)) {
        (true, Some(port)) => format!("{}:{port}", field(item, "hostname")),
        _ => field(item, "hostname"),
    }
}

fn labels(item: &Value) -> String {
    match item.get("labels").and_then(Value::as_object) {
        Some(map) if !map.is_empty() => {
            let mut pairs: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), String::from)))
                .collect();
            pairs.sort();
            pairs.join(",")
        }
        _ => "-".to_string(),
    }
}

/// Renders rows with columns padded to their widest cell.
pub fn table(kind: Kind, items: &[Value]) -> String {
    let (headers, rows): (Vec<&str>, Vec<Vec<String>>) = match kind {
        Kind::Tunnels => (
            vec!["ID", "NAME", "STATUS", "PUBLISH", "PROTOCOL", "ADDRESS", "CLIENT", "USER", "LABELS"],
            items
                .iter()
                .map(|t| {
                    vec![
                        field(t, "id"),
                        field(t, "name"),
                        field(t, "status"),
                        field(t, "publish"),
                        field(t, "protocol"),
                        address(t),
                        field(t, "client_id"),
                        field(t, "user_id"),
                        labels(t),
                    ]
                })
                .collect(),
        ),
        Kind::Clients => (
            vec!["ID", "STATUS", "USER", "AGENT", "VERSION", "OS", "ARCH", "PROTOCOL", "LABELS"],
            items
                .iter()
                .map(|c| {
                    vec![
                        field(c, "id"),
                        field(c, "status"),
                        field(c, "user_id"),
                        field(c, "agent"),
                        field(c, "version"),
                        field(c, "os"),
                        field(c, "arch"),
                        field(c, "protocol_version"),
                        labels(c),
                    ]
                })
                .collect(),
        ),
    };
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push('\n');
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tunnels_render_as_aligned_columns() {
        let items = vec![
            json!({"id": "t1", "name": "web", "status": "online", "publish": true, "protocol": "http",
                   "hostname": "abc.t.localhost", "client_id": "c1", "user_id": "alice", "labels": {"b": "2", "a": "1"}}),
            json!({"id": "t22", "name": null, "status": "online", "publish": false, "client_id": "c1", "user_id": "alice"}),
            json!({"id": "t3", "publish": true, "protocol": "tcp", "hostname": "edge.example.com", "port": 20001}),
        ];
        let text = table(Kind::Tunnels, &items);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[3].contains(" edge.example.com:20001 "), "{text}");
        assert!(lines[0].starts_with("ID   NAME  STATUS  PUBLISH"));
        assert!(lines[1].ends_with("a=1,b=2"));
        assert!(lines[2].starts_with("t22  -     online  no"));
    }
}
