//! Routes read from the protos' `google.api.http` annotations at start-up:
//! no route is written by hand, and a new annotated RPC is served as soon as
//! it is in the descriptor set.

use http::Method;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, Value};

/// One segment of a URL template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Must match exactly.
    Literal(String),
    /// Binds one path segment to a request field.
    Field(String),
}

/// A parsed URL template such as `/v1/merchants/{merchant_id}/entries/{entry_id}:reverse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    verb: Option<String>,
    text: String,
}

/// Why an annotation could not be used.
#[derive(Debug, thiserror::Error)]
#[error("route of {method}: {reason}")]
pub struct RouteError {
    method: String,
    reason: String,
}

impl PathTemplate {
    /// Parses the subset of the template grammar fluxo uses: literal
    /// segments, `{field}` variables, and a trailing `:verb`.
    pub fn parse(template: &str) -> Result<Self, String> {
        let path = template.strip_prefix('/').ok_or("must start with '/'")?;
        // A custom verb follows the last segment, after a ':' outside braces.
        let (path, verb) = match path.rfind(':') {
            Some(i) if !path[i..].contains('}') => (&path[..i], Some(path[i + 1..].to_owned())),
            _ => (path, None),
        };
        let segments = path
            .split('/')
            .map(|s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(field) if field.contains('=') => Err(format!("unsupported variable pattern {s}")),
                Some(field) => Ok(Segment::Field(field.to_owned())),
                None if s.is_empty() || s.contains(['{', '}']) => Err(format!("bad segment {s:?}")),
                None => Ok(Segment::Literal(s.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { segments, verb, text: template.to_owned() })
    }

    /// The field bindings when `path` matches.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let path = path.strip_prefix('/')?;
        let path = match &self.verb {
            Some(verb) => path.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => path,
        };
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() != self.segments.len() {
            return None;
        }
        let mut bindings = Vec::new();
        for (segment, part) in self.segments.iter().zip(parts) {
            match segment {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Field(_) if part.is_empty() => return None,
                Segment::Field(f) => bindings.push((f.clone(), percent_decode(part)?)),
            }
        }
        Some(bindings)
    }

    /// The template as written in the proto.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Field names bound by the path.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Field(f) => Some(f.as_str()),
            Segment::Literal(_) => None,
        })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// One REST route.
#[derive(Debug, Clone)]
pub struct Route {
    /// HTTP method.
    pub method: Method,
    /// URL template.
    pub template: PathTemplate,
    /// `*` (the whole request), a field name, or empty (no body).
    pub body: String,
    /// The RPC it calls.
    pub rpc: MethodDescriptor,
}

/// Every route of the given services.
#[derive(Debug, Clone)]
pub struct Routes {
    routes: Vec<Route>,
}

/// What looking a request up found.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// A route and its path bindings.
    Found(&'a Route, Vec<(String, String)>),
    /// The path exists, with other methods.
    MethodNotAllowed(Vec<Method>),
    /// No route has this path.
    NotFound,
}

impl Routes {
    /// Reads the `google.api.http` annotation of every method of `services`.
    pub fn from_pool(pool: &DescriptorPool, services: &[&str]) -> Result<Self, RouteError> {
        let err = |method: &MethodDescriptor, reason: String| RouteError {
            method: method.full_name().to_owned(),
            reason,
        };
        let extension = pool.get_extension_by_name("google.api.http").ok_or_else(|| RouteError {
            method: String::new(),
            reason: "google.api.http is not in the descriptor set".into(),
        })?;
        let mut routes = Vec::new();
        for name in services {
            let service = pool.get_service_by_name(name).ok_or_else(|| RouteError {
                method: (*name).to_owned(),
                reason: "service not in the descriptor set".into(),
            })?;
            for rpc in service.methods() {
                let options = rpc.options();
                if !options.has_extension(&extension) {
                    continue;
                }
                let Value::Message(rule) = options.get_extension(&extension).into_owned() else {
                    return Err(err(&rpc, "annotation is not an HttpRule".into()));
                };
                let (method, template) =
                    verb_and_template(&rule).ok_or_else(|| err(&rpc, "no HTTP method".into()))?;
                let template = PathTemplate::parse(&template).map_err(|e| err(&rpc, e))?;
                let body = text(&rule, "body");
                routes.push(Route { method, template, body, rpc: rpc.clone() });
            }
        }
        Ok(Self { routes })
    }

    /// The route for `method` and `path`.
    pub fn lookup(&self, method: &Method, path: &str) -> Lookup<'_> {
        let mut allowed = Vec::new();
        for route in &self.routes {
            if let Some(bindings) = route.template.matches(path) {
                if route.method == *method {
                    return Lookup::Found(route, bindings);
                }
                allowed.push(route.method.clone());
            }
        }
        if allowed.is_empty() { Lookup::NotFound } else { Lookup::MethodNotAllowed(allowed) }
    }

    /// Every route, in declaration order.
    pub fn all(&self) -> &[Route] {
        &self.routes
    }
}

fn text(rule: &DynamicMessage, field: &str) -> String {
    match rule.get_field_by_name(field).as_deref() {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    }
}

fn verb_and_template(rule: &DynamicMessage) -> Option<(Method, String)> {
    for (field, method) in [
        ("get", Method::GET),
        ("post", Method::POST),
        ("put", Method::PUT),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ] {
        if rule.has_field_by_name(field) {
            return Some((method, text(rule, field)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_bind_fields_and_custom_verbs() {
        let t = PathTemplate::parse("/v1/merchants/{merchant_id}/entries/{entry_id}:reverse").unwrap();
        assert_eq!(
            t.matches("/v1/merchants/m-1/entries/E1:reverse"),
            Some(vec![("merchant_id".into(), "m-1".into()), ("entry_id".into(), "E1".into())])
        );
        assert_eq!(t.matches("/v1/merchants/m-1/entries/E1"), None);
        assert_eq!(t.matches("/v1/merchants//entries/E1:reverse"), None);
        let plain = PathTemplate::parse("/v1/merchants/{merchant_id}/entries").unwrap();
        assert_eq!(plain.matches("/v1/merchants/a%20b/entries").unwrap()[0].1, "a b");
        assert_eq!(plain.matches("/v1/merchants/m/entries/x"), None);
    }

    #[test]
    fn every_fluxo_rpc_has_its_route() {
        let pool = DescriptorPool::decode(fluxo_proto::FILE_DESCRIPTOR_SET).unwrap();
        let routes = Routes::from_pool(&pool, &crate::SERVICES).unwrap();
        let listed: Vec<String> =
            routes.all().iter().map(|r| format!("{} {}", r.method, r.template.as_str())).collect();
        assert_eq!(
            listed,
            [
                "POST /v1/merchants/{merchant_id}/entries",
                "GET /v1/merchants/{merchant_id}/entries/{entry_id}",
                "GET /v1/merchants/{merchant_id}/entries",
                "POST /v1/merchants/{merchant_id}/entries/{entry_id}:reverse",
                "POST /v1/merchants/{merchant_id}/entries:batchRecord",
                "GET /v1/merchants/{merchant_id}/entries:export",
                "POST /v1/merchants/{merchant_id}/periods:close",
                "POST /v1/merchants/{merchant_id}/periods:reopen",
                "GET /v1/merchants/{merchant_id}/periods",
                "GET /v1/merchants/{merchant_id}/balances/{date}",
                "GET /v1/merchants/{merchant_id}/balances",
                "GET /v1/merchants/{merchant_id}/balances:export",
                "POST /v1/merchants/{merchant_id}/webhooks",
                "GET /v1/merchants/{merchant_id}/webhooks/{subscription_id}",
                "GET /v1/merchants/{merchant_id}/webhooks",
                "PATCH /v1/merchants/{merchant_id}/webhooks/{subscription_id}",
                "POST /v1/merchants/{merchant_id}/webhooks/{subscription_id}:pause",
                "POST /v1/merchants/{merchant_id}/webhooks/{subscription_id}:resume",
                "POST /v1/merchants/{merchant_id}/webhooks/{subscription_id}:rotateSecret",
                "DELETE /v1/merchants/{merchant_id}/webhooks/{subscription_id}",
            ]
        );
        assert!(matches!(
            routes.lookup(&Method::DELETE, "/v1/merchants/m/entries"),
            Lookup::MethodNotAllowed(_)
        ));
        assert!(matches!(routes.lookup(&Method::GET, "/v2/nothing"), Lookup::NotFound));
        // A custom verb is its own route, not an entry id or a merchant's list.
        let Lookup::Found(export, bindings) = routes.lookup(&Method::GET, "/v1/merchants/m-1/entries:export")
        else {
            panic!("the export route is found")
        };
        assert_eq!(export.rpc.name(), "ExportEntries");
        assert_eq!(bindings, [("merchant_id".to_owned(), "m-1".to_owned())]);
    }
}
