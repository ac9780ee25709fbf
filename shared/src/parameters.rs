//! A Terraform template's parameters (its `devmesh_parameter` data sources,
//! recorded when a version is imported) and the checks a value must pass
//! before a build is queued with it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One parameter of a template version.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct TemplateParameter {
    /// Its name, as builds give it.
    pub name: String,
    /// `string`, `number`, `bool` or `list(string)` (a JSON array of strings).
    #[serde(rename = "type")]
    pub kind: String,
    /// What it is for.
    #[serde(default)]
    pub description: Option<String>,
    /// The value when none is given; without one the parameter is required.
    #[serde(default)]
    pub default: Option<String>,
    /// Whether it may change after the workspace is created.
    #[serde(default)]
    pub mutable: bool,
    /// The only values allowed, when set.
    #[serde(default)]
    pub options: Vec<String>,
    /// Smallest number allowed.
    #[serde(default)]
    pub validation_min: Option<f64>,
    /// Largest number allowed.
    #[serde(default)]
    pub validation_max: Option<f64>,
    /// A pattern a string must match (whole value).
    #[serde(default)]
    pub validation_regex: Option<String>,
}

/// Checks one value against its parameter; the error is for a person.
pub fn check_value(p: &TemplateParameter, value: &str) -> Result<(), String> {
    if !p.options.is_empty() && !p.options.iter().any(|o| o == value) {
        return Err(format!("must be one of {}", p.options.join(", ")));
    }
    match p.kind.as_str() {
        "number" => {
            let n: f64 = value
                .trim()
                .parse()
                .ok()
                .filter(|n: &f64| n.is_finite())
                .ok_or("must be a number")?;
            if let Some(min) = p.validation_min.filter(|m| n < *m) {
                return Err(format!("must be at least {min}"));
            }
            if let Some(max) = p.validation_max.filter(|m| n > *m) {
                return Err(format!("must be at most {max}"));
            }
        }
        "bool" if !matches!(value, "true" | "false") => return Err("must be true or false".into()),
        "list(string)" => {
            serde_json::from_str::<Vec<String>>(value)
                .map_err(|_| "must be a JSON list of strings".to_owned())?;
        }
        _ => {}
    }
    if let Some(pattern) = &p.validation_regex {
        let re = regex_lite::Regex::new(&format!("^(?:{pattern})$"))
            .map_err(|e| format!("the template's pattern {pattern:?} is invalid: {e}"))?;
        if !re.is_match(value) {
            return Err(format!("must match {pattern}"));
        }
    }
    Ok(())
}

/// Checks a version's parameters as a whole (what an import found, or what
/// a daemon reports): unique names, known types, usable patterns, and
/// defaults that pass their own checks. At most 64 parameters.
pub fn check_definitions(params: &[TemplateParameter]) -> Result<(), String> {
    if params.len() > 64 {
        return Err(format!("{} parameters: at most 64", params.len()));
    }
    for (i, p) in params.iter().enumerate() {
        if p.name.is_empty() || p.name.len() > 64 {
            return Err(format!(
                "parameter {:?}: a name is 1 to 64 characters",
                p.name
            ));
        }
        if params[..i].iter().any(|q| q.name == p.name) {
            return Err(format!(
                "two devmesh_parameter data sources are named {:?}",
                p.name
            ));
        }
        if !matches!(
            p.kind.as_str(),
            "string" | "number" | "bool" | "list(string)"
        ) {
            return Err(format!("parameter {:?}: unknown type {:?}", p.name, p.kind));
        }
        if let Some(pattern) = &p.validation_regex {
            regex_lite::Regex::new(&format!("^(?:{pattern})$"))
                .map_err(|e| format!("parameter {:?}: its pattern is invalid: {e}", p.name))?;
        }
        if let Some(d) = &p.default {
            check_value(p, d).map_err(|e| format!("parameter {:?}: its default {e}", p.name))?;
        }
    }
    Ok(())
}

/// The values a build runs with: `given` over `previous` (an earlier
/// build's) over defaults, each checked. Errors name every problem by
/// parameter. A value for a parameter the template does not have is an
/// error too: a typo must not go unnoticed.
pub fn resolve(
    params: &[TemplateParameter],
    given: &BTreeMap<String, String>,
    previous: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Vec<(String, String)>> {
    let mut problems = Vec::new();
    for name in given.keys() {
        if !params.iter().any(|p| &p.name == name) {
            problems.push((
                name.clone(),
                "the template has no such parameter".to_owned(),
            ));
        }
    }
    let mut values = BTreeMap::new();
    for p in params {
        let value = given
            .get(&p.name)
            .or_else(|| previous.get(&p.name))
            .or(p.default.as_ref());
        match value {
            None => problems.push((p.name.clone(), "is required".to_owned())),
            Some(v) => match check_value(p, v) {
                Ok(()) => {
                    values.insert(p.name.clone(), v.clone());
                }
                Err(e) => problems.push((p.name.clone(), e)),
            },
        }
    }
    if problems.is_empty() {
        Ok(values)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(name: &str, kind: &str) -> TemplateParameter {
        TemplateParameter {
            name: name.into(),
            kind: kind.into(),
            ..Default::default()
        }
    }

    #[test]
    fn definitions_are_checked_as_a_whole() {
        let ok = vec![param("a", "string"), param("b", "number")];
        assert!(check_definitions(&ok).is_ok());
        let twice = vec![param("a", "string"), param("a", "bool")];
        assert!(check_definitions(&twice).unwrap_err().contains("two"));
        let odd = vec![param("a", "map")];
        assert!(
            check_definitions(&odd)
                .unwrap_err()
                .contains("unknown type")
        );
        let bad_default = vec![TemplateParameter {
            default: Some("x".into()),
            ..param("n", "number")
        }];
        assert!(
            check_definitions(&bad_default)
                .unwrap_err()
                .contains("default")
        );
        let bad_pattern = vec![TemplateParameter {
            validation_regex: Some("(".into()),
            ..param("s", "string")
        }];
        assert!(check_definitions(&bad_pattern).is_err());
    }

    #[test]
    fn values_are_checked_by_type_options_range_and_pattern() {
        let cpu = TemplateParameter {
            validation_min: Some(1.0),
            validation_max: Some(8.0),
            ..param("cpu", "number")
        };
        assert!(check_value(&cpu, "4").is_ok());
        assert_eq!(check_value(&cpu, "16").unwrap_err(), "must be at most 8");
        assert_eq!(check_value(&cpu, "four").unwrap_err(), "must be a number");
        assert!(check_value(&cpu, "NaN").is_err());
        let region = TemplateParameter {
            options: vec!["eu".into(), "us".into()],
            ..param("region", "string")
        };
        assert!(check_value(&region, "eu").is_ok());
        assert_eq!(
            check_value(&region, "ap").unwrap_err(),
            "must be one of eu, us"
        );
        let user = TemplateParameter {
            validation_regex: Some("[a-z]+".into()),
            ..param("user", "string")
        };
        assert!(check_value(&user, "alice").is_ok());
        assert!(
            check_value(&user, "alice; rm -rf /").is_err(),
            "the whole value must match"
        );
        assert!(check_value(&param("on", "bool"), "yes").is_err());
        assert!(check_value(&param("l", "list(string)"), r#"["a","b"]"#).is_ok());
        assert!(check_value(&param("l", "list(string)"), "a,b").is_err());
    }

    #[test]
    fn resolving_takes_given_then_previous_then_default_and_names_every_problem() {
        let params = vec![
            TemplateParameter {
                default: Some("eu".into()),
                ..param("region", "string")
            },
            param("size", "number"),
        ];
        let given = BTreeMap::from([("size".to_owned(), "3".to_owned())]);
        let values = resolve(&params, &given, &BTreeMap::new()).unwrap();
        assert_eq!(values["region"], "eu");
        assert_eq!(values["size"], "3");
        let previous = BTreeMap::from([("region".to_owned(), "us".to_owned())]);
        assert_eq!(resolve(&params, &given, &previous).unwrap()["region"], "us");
        let bad = BTreeMap::from([("sise".to_owned(), "3".to_owned())]);
        let problems = resolve(&params, &bad, &BTreeMap::new()).unwrap_err();
        let names: Vec<_> = problems.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["sise", "size"]);
    }
}
