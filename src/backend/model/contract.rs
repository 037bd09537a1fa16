//! The graph contract: what a variant's session must take and give (token inputs, the pooled
//! output, the `past.*`/`present.*` prefix states) checked against the manifest when the model
//! loads, and the start states the exporter computed for the ids every input begins with.

use std::borrow::Cow;

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use super::forward::value_bytes;
use super::{PastLayout, Prefix};
use crate::backend::runtime::{self, GraphShape};
use crate::error::{Error, Result};
use crate::package::{Package, StartStatesSpec, VariantSpec};

/// Runs the start-state graph of `spec` (no inputs) once: its outputs, in the order of the model's
/// `past.*` inputs, as the prefix of the ids every input begins with.
pub(super) fn start_states(
    package: &Package,
    variant: &str,
    spec: &StartStatesSpec,
    layout: &PastLayout,
) -> Result<Prefix> {
    let path = package.path(&spec.file);
    let context = format!("cannot read the start states {}", path.display());
    let env = runtime::environment(None)?;
    let mut session = Session::builder(env)
        .map_err(Error::runtime(context.clone()))?
        .commit_from_file(&path)
        .map_err(Error::runtime(context.clone()))?;
    let mut outputs = session
        .run(Vec::<(Cow<'static, str>, SessionInputValue<'_>)>::new())
        .map_err(Error::runtime(context))?;
    let mut states = Vec::with_capacity(layout.names.len());
    let mut bytes = 0;
    for (past, _) in &layout.names {
        let value = outputs.remove(past.as_str()).ok_or_else(|| {
            Error::graph(variant, format!("{} has no output {past:?}", spec.file))
        })?;
        bytes += value_bytes(&value);
        states.push(value);
    }
    Ok(Prefix {
        ids: spec.ids.clone(),
        states,
        bytes,
    })
}

pub(super) fn graph_shape(package: &Package, spec: &VariantSpec) -> GraphShape {
    let a = &package.manifest.architecture;
    GraphShape {
        inputs: spec.inputs.clone(),
        past: spec
            .prefix_cache
            .as_ref()
            .map(|p| p.names(a.layers).into_iter().map(|(i, _)| i).collect())
            .unwrap_or_default(),
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        fp16: spec.dtype == "float16",
    }
}

/// Checks the session's inputs and outputs against the manifest; returns the token input names in
/// graph order and the output name.
pub(super) fn check_graph(
    package: &Package,
    name: &str,
    variant: &VariantSpec,
    session: &Session,
) -> Result<(Vec<String>, String)> {
    let past: Vec<String> = match &variant.prefix_cache {
        Some(spec) => spec
            .names(package.manifest.architecture.layers)
            .into_iter()
            .map(|(input, _)| input)
            .collect(),
        None => Vec::new(),
    };
    let graph_inputs: Vec<String> = session
        .inputs()
        .iter()
        .map(|i| i.name().to_string())
        .filter(|n| !past.contains(n))
        .collect();
    let mut a: Vec<String> = session
        .inputs()
        .iter()
        .map(|i| i.name().to_string())
        .collect();
    let mut b: Vec<String> = variant.inputs.iter().chain(&past).cloned().collect();
    a.sort();
    b.sort();
    if a != b {
        return Err(Error::package(
            &package.dir,
            format!("variant {name}: the graph takes inputs {a:?}, the manifest says {b:?}"),
        ));
    }
    for input in session
        .inputs()
        .iter()
        .filter(|i| !past.iter().any(|p| p == i.name()))
    {
        if let ValueType::Tensor { ty, .. } = input.dtype() {
            if *ty != TensorElementType::Int64 {
                return Err(Error::package(
                    &package.dir,
                    format!(
                        "variant {name}: input {} is {ty:?}, expected int64",
                        input.name()
                    ),
                ));
            }
        }
    }
    if !session.outputs().iter().any(|o| o.name() == variant.output) {
        let have: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        return Err(Error::package(
            &package.dir,
            format!(
                "variant {name}: the graph has no output {:?} (it has {have:?})",
                variant.output
            ),
        ));
    }
    Ok((graph_inputs, variant.output.clone()))
}

/// The prefix-state layout of a variant whose manifest declares one: checks that the graph has
/// every `past.*` input and `present.*` output in the declared dtype, and builds the zero-length
/// states fed to runs without a prefix.
pub(super) fn past_layout(
    package: &Package,
    name: &str,
    variant: &VariantSpec,
    session: &Session,
) -> Result<Option<PastLayout>> {
    let Some(spec) = &variant.prefix_cache else {
        return Ok(None);
    };
    let arch = &package.manifest.architecture;
    let want = match spec.dtype.as_str() {
        "float32" => TensorElementType::Float32,
        "float16" => TensorElementType::Float16,
        other => {
            return Err(Error::package(
                &package.dir,
                format!("variant {name}: prefix_cache dtype {other:?} is not float32 or float16"),
            ))
        }
    };
    let names = spec.names(arch.layers);
    let bad = |what: String| Error::package(&package.dir, format!("variant {name}: {what}"));
    for (input, output) in &names {
        let i = session
            .inputs()
            .iter()
            .find(|i| i.name() == input)
            .ok_or_else(|| bad(format!("the graph has no prefix-state input {input:?}")))?;
        if !matches!(i.dtype(), ValueType::Tensor { ty, .. } if *ty == want) {
            return Err(bad(format!(
                "prefix-state input {input:?} is not {}",
                spec.dtype
            )));
        }
        if !session.outputs().iter().any(|o| o.name() == output) {
            return Err(bad(format!(
                "the graph has no prefix-state output {output:?}"
            )));
        }
    }
    let shape = [1usize, arch.kv_heads, 0, arch.head_dim];
    let empty = names
        .iter()
        .map(|(input, _)| -> Result<DynValue> {
            let value = match want {
                TensorElementType::Float16 => {
                    Tensor::from_array((shape, Vec::<half::f16>::new())).map(|t| t.into_dyn())
                }
                _ => Tensor::from_array((shape, Vec::<f32>::new())).map(|t| t.into_dyn()),
            };
            value.map_err(Error::runtime(format!("cannot build input {input}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(PastLayout { names, empty }))
}
