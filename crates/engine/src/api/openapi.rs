//! The OpenAPI 3.1 document, generated from the handlers' annotations and
//! the [`super::model`] types, built once and served as it is.

use std::sync::OnceLock;

use serde_json::{Value, json};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{events, inventory, model};

/// The title the CE runbook reads with `jq -r .info.title`.
pub const TITLE: &str = "strait Engine API";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "strait Engine API",
        description = "The rstream engine Community Edition API as strait serves it: the live inventory of \
            clients and tunnels and their lifecycle events. Every endpoint but this document and the health \
            checks needs an engine token as `Authorization: Bearer <jwt>`."
    ),
    paths(
        super::openapi_json,
        super::healthz,
        super::readyz,
        inventory::list_clients,
        inventory::get_client,
        inventory::list_tunnels,
        inventory::get_tunnel,
        inventory::list_reservations,
        inventory::purge_cache,
        events::sse,
        events::websocket,
    ),
    components(schemas(
        model::Client,
        model::Tunnel,
        model::Status,
        model::ClientFilters,
        model::TunnelFilters,
        model::ClientListParams,
        model::TunnelListParams,
        model::WatchParams,
        model::Event,
        model::EventType,
        model::EventObject,
        model::Snapshot,
        model::Reservation,
        model::ReservationKind,
        inventory::Purged,
    )),
    modifiers(&Security),
    tags(
        (name = "inventory", description = "Live clients and tunnels"),
        (name = "events", description = "Lifecycle events, live"),
        (name = "operations", description = "The document itself and health checks"),
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An engine token: HS256, signed with auth.jwt.token_jwt_secret"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "query_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "rstream.token",
                "The same token as a query parameter, on the streaming endpoints only",
            ))),
        );
    }
}

/// The schema each endpoint's `params` query parameter carries.
fn params_schema(path: &str) -> Option<&'static str> {
    match path {
        "/api/clients" => Some("ClientListParams"),
        "/api/tunnels" => Some("TunnelListParams"),
        "/api/sse" | "/api/websocket" => Some("WatchParams"),
        _ => None,
    }
}

/// The document. `params` is JSON inside a query parameter, which OpenAPI
/// says with `content` rather than `schema`; utoipa's parameter type has no
/// `content`, so that one detail is set on the generated JSON.
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serialises");
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let Some(schema) = params_schema(path) else { continue };
            let Some(parameters) = item.pointer_mut("/get/parameters").and_then(Value::as_array_mut) else {
                continue;
            };
            for parameter in parameters.iter_mut().filter(|p| p["name"] == "params") {
                let object = parameter.as_object_mut().expect("a parameter is an object");
                object.remove("schema");
                object.insert(
                    "content".into(),
                    json!({"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}),
                );
            }
        }
    }
    doc
}

/// The document as served, built on first use.
pub fn document_text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| serde_json::to_string_pretty(&document()).expect("the document serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_describes_every_endpoint() {
        let doc: Value = serde_json::from_str(document_text()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["title"], TITLE);
        for path in [
            "/api/openapi.json",
            "/healthz",
            "/readyz",
            "/api/clients",
            "/api/clients/{id}",
            "/api/tunnels",
            "/api/tunnels/{id}",
            "/api/sse",
            "/api/websocket",
        ] {
            assert!(doc["paths"][path]["get"].is_object(), "{path} missing");
        }
        let params = &doc["paths"]["/api/tunnels"]["get"]["parameters"][0];
        assert_eq!(params["name"], "params");
        assert_eq!(params["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/TunnelListParams");
        assert!(doc["components"]["schemas"]["Tunnel"]["properties"]["geo_ip"].is_object());
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }
}
