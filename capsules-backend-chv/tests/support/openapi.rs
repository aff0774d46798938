//! A small validator for the subset of JSON Schema that CH's OpenAPI description uses: `$ref`,
//! `type`, `properties` (closed: a property not listed is an error unless `additionalProperties`
//! gives a schema), `required`, `items`, `enum`, `minimum`/`maximum`, `minLength`, integer `format`s.

use serde_json::Value;

/// CH's OpenAPI document, loaded from `CAPSULES_CH_OPENAPI`.
#[derive(Debug, Clone)]
pub struct Spec {
    doc: Value,
}

/// Where the spec is, or why it is not there.
pub enum SpecSource {
    Loaded(Spec),
    /// Not configured: validating tests are ignored with this reason.
    Missing(String),
    /// Configured (or required by CI) but unreadable: validating tests fail with this reason.
    Broken(String),
}

impl Spec {
    pub fn from_env() -> SpecSource {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
        let Some(path) = std::env::var_os("CAPSULES_CH_OPENAPI").filter(|v| !v.is_empty()) else {
            let why = "CAPSULES_CH_OPENAPI is not set (point it at shared/reference/cloud-hypervisor-openapi.yaml)";
            return if ci {
                SpecSource::Broken(format!("CI is set but {why}"))
            } else {
                SpecSource::Missing(why.into())
            };
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                let why = format!("cannot read CAPSULES_CH_OPENAPI={}: {e}", path.to_string_lossy());
                return SpecSource::Broken(why);
            }
        };
        match Spec::parse(&text) {
            Ok(s) => SpecSource::Loaded(s),
            Err(e) => SpecSource::Broken(format!("CAPSULES_CH_OPENAPI is not a usable OpenAPI document: {e}")),
        }
    }

    pub fn parse(text: &str) -> Result<Spec, String> {
        let doc: Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        if doc.pointer("/components/schemas/VmConfig").is_none() || doc.get("paths").is_none() {
            return Err("it has no paths or no VmConfig schema".into());
        }
        Ok(Spec { doc })
    }

    /// Checks one request: `path` is the URI path (`/api/v1/vm.create`).
    pub fn check_request(&self, method: &str, path: &str, body: Option<&Value>) -> Vec<String> {
        let mut errs = Vec::new();
        let Some(endpoint) = path.strip_prefix("/api/v1") else {
            return vec![format!("{method} {path}: not under the API base /api/v1")];
        };
        let Some(op) = self
            .doc
            .pointer(&format!("/paths/{}/{}", escape(endpoint), method.to_lowercase()))
        else {
            return vec![format!("{method} {endpoint}: no such operation in CH's API")];
        };
        let schema = op.pointer("/requestBody/content/application~1json/schema");
        let required = op
            .pointer("/requestBody/required")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        match (schema, body) {
            (Some(s), Some(b)) => self.check(s, b, endpoint, &mut errs),
            (Some(_), None) if required => errs.push(format!("{method} {endpoint}: the request body is required")),
            (None, Some(_)) => errs.push(format!("{method} {endpoint}: takes no request body")),
            _ => {}
        }
        errs
    }

    /// Checks one reply body against the operation's response schema for `status`.
    pub fn check_response(&self, method: &str, endpoint: &str, status: u16, body: Option<&Value>) -> Vec<String> {
        let mut errs = Vec::new();
        let op = format!(
            "/paths/{}/{}/responses/{status}",
            escape(endpoint),
            method.to_lowercase()
        );
        let Some(resp) = self.doc.pointer(&op) else {
            // CH documents its success statuses; error statuses are often undocumented.
            if status < 300 {
                errs.push(format!("{method} {endpoint}: status {status} is not documented"));
            }
            return errs;
        };
        if let (Some(s), Some(b)) = (resp.pointer("/content/application~1json/schema"), body) {
            self.check(s, b, &format!("{endpoint} reply"), &mut errs);
        }
        errs
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> Result<&'a Value, String> {
        let mut s = schema;
        for _ in 0..16 {
            match s.get("$ref").and_then(Value::as_str) {
                Some(r) => {
                    let ptr = r.strip_prefix('#').ok_or_else(|| format!("external $ref {r}"))?;
                    s = self.doc.pointer(ptr).ok_or_else(|| format!("dangling $ref {r}"))?;
                }
                None => return Ok(s),
            }
        }
        Err("$ref cycle".into())
    }

    pub fn check(&self, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
        let schema = match self.resolve(schema) {
            Ok(s) => s,
            Err(e) => return errs.push(format!("{at}: {e}")),
        };
        if let Some(list) = schema.get("enum").and_then(Value::as_array)
            && !list.contains(v)
        {
            errs.push(format!("{at}: {v} is not one of {list:?}"));
        }
        let ty = schema.get("type").and_then(Value::as_str);
        match ty {
            Some("object") => self.check_object(schema, v, at, errs),
            Some("array") => match v.as_array() {
                Some(items) => {
                    if let Some(item) = schema.get("items") {
                        for (i, x) in items.iter().enumerate() {
                            self.check(item, x, &format!("{at}[{i}]"), errs);
                        }
                    }
                }
                None => errs.push(format!("{at}: expected an array, got {v}")),
            },
            Some("string") => match v.as_str() {
                Some(s) => {
                    let min = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0);
                    if (s.chars().count() as u64) < min {
                        errs.push(format!("{at}: shorter than {min}"));
                    }
                }
                None => errs.push(format!("{at}: expected a string, got {v}")),
            },
            Some("integer") => self.check_integer(schema, v, at, errs),
            Some("number") => {
                if !v.is_number() {
                    errs.push(format!("{at}: expected a number, got {v}"));
                }
            }
            Some("boolean") => {
                if !v.is_boolean() {
                    errs.push(format!("{at}: expected a boolean, got {v}"));
                }
            }
            Some(other) => errs.push(format!("{at}: the validator does not know type {other}")),
            None => {
                if schema.get("properties").is_some() {
                    self.check_object(schema, v, at, errs);
                }
            }
        }
    }

    fn check_object(&self, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
        let Some(obj) = v.as_object() else {
            return errs.push(format!("{at}: expected an object, got {v}"));
        };
        let props = schema.get("properties").and_then(Value::as_object);
        for req in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if let Some(name) = req.as_str()
                && !obj.contains_key(name)
            {
                errs.push(format!("{at}: missing required property {name}"));
            }
        }
        let extra = schema.get("additionalProperties");
        for (k, x) in obj {
            let here = format!("{at}.{k}");
            match (props.and_then(|p| p.get(k)), extra) {
                (Some(s), _) => self.check(s, x, &here, errs),
                (None, Some(Value::Bool(true))) => {}
                (None, Some(s)) if s.is_object() => self.check(s, x, &here, errs),
                // A free-form object (no properties listed) takes anything.
                (None, None) if props.is_none() => {}
                (None, _) => errs.push(format!("{at}: unknown property {k}")),
            }
        }
    }

    fn check_integer(&self, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
        let n: i128 = match (v.as_i64(), v.as_u64()) {
            (Some(i), _) => i as i128,
            (None, Some(u)) => u as i128,
            _ => return errs.push(format!("{at}: expected an integer, got {v}")),
        };
        let range: Option<(i128, i128)> = match schema.get("format").and_then(Value::as_str) {
            Some("int8") => Some((i8::MIN as i128, i8::MAX as i128)),
            Some("int16") => Some((i16::MIN as i128, i16::MAX as i128)),
            Some("int32") => Some((i32::MIN as i128, i32::MAX as i128)),
            Some("int64") => Some((i64::MIN as i128, i64::MAX as i128)),
            Some("uint8") => Some((0, u8::MAX as i128)),
            Some("uint16") => Some((0, u16::MAX as i128)),
            Some("uint32") => Some((0, u32::MAX as i128)),
            Some("uint64") => Some((0, u64::MAX as i128)),
            _ => None,
        };
        if let Some((lo, hi)) = range
            && (n < lo || n > hi)
        {
            errs.push(format!("{at}: {n} is out of range for its format"));
        }
        if let Some(min) = schema.get("minimum").and_then(Value::as_i64)
            && n < min as i128
        {
            errs.push(format!("{at}: {n} is below the minimum {min}"));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_i64)
            && n > max as i128
        {
            errs.push(format!("{at}: {n} is above the maximum {max}"));
        }
    }
}

/// JSON-pointer escaping of one path segment (`/vm.create` → `~1vm.create`).
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}
