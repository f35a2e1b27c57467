//! The `#[stage]` attribute of `sink-api`; use it as `#[sink_api::stage(...)]`
//! (documented there).

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::quote;
use syn::parse::{Parse, ParseStream};
use syn::{Error, ItemImpl, LitStr, Token};

/// `name = "..."`, the one argument of `#[stage]`.
struct StageName(LitStr);

impl Parse for StageName {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let key: syn::Ident = input.parse()?;
        if key != "name" {
            return Err(Error::new(key.span(), "expected `name = \"...\"`"));
        }
        input.parse::<Token![=]>()?;
        let name: LitStr = input.parse()?;
        if name.value().is_empty() {
            return Err(Error::new(name.span(), "a stage type needs a name"));
        }
        Ok(Self(name))
    }
}

/// Registers a stage type under one name, with `typetag` (so that
/// `pipeline.toml` can name it) and in the catalogue (so that `sink list` and
/// `sink describe` show it and its restart-only keys are honoured).
#[proc_macro_attribute]
pub fn stage(args: TokenStream, item: TokenStream) -> TokenStream {
    match expand(args, item) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

fn expand(args: TokenStream, item: TokenStream) -> syn::Result<proc_macro2::TokenStream> {
    let StageName(name) = syn::parse(args).map_err(|err| {
        Error::new(
            err.span(),
            format!("{err}: write #[sink_api::stage(name = \"my_type\")]"),
        )
    })?;
    let item: ItemImpl = syn::parse(item).map_err(|err| {
        Error::new(
            err.span(),
            "#[sink_api::stage] goes on an `impl SourceConfig/ProcessorConfig/SinkConfig for YourConfig` block",
        )
    })?;
    let Some((_, trait_path, _)) = &item.trait_ else {
        return Err(Error::new(
            Span::call_site(),
            "#[sink_api::stage] goes on an `impl SourceConfig/ProcessorConfig/SinkConfig for YourConfig` block",
        ));
    };
    let trait_name = trait_path
        .segments
        .last()
        .map(|segment| segment.ident.to_string())
        .unwrap_or_default();
    let kind = match trait_name.as_str() {
        "SourceConfig" => quote!(source),
        "ProcessorConfig" => quote!(processor),
        "SinkConfig" => quote!(sink),
        _ => {
            return Err(Error::new_spanned(
                trait_path,
                "#[sink_api::stage] implements SourceConfig, ProcessorConfig or SinkConfig",
            ));
        }
    };
    if !item.generics.params.is_empty() {
        return Err(Error::new_spanned(
            &item.generics,
            "a stage config type cannot be generic: each type has one name",
        ));
    }
    let config = &item.self_ty;
    // typetag's expansion names `typetag::...`: the `use` lets it resolve in a
    // crate that depends on sink-api alone. The block keeps that name local.
    Ok(quote! {
        const _: () = {
            use ::sink_api::__private::typetag;
            #[typetag::serde(name = #name)]
            #item
        };
        ::sink_api::register_stage!(#kind #name => #config);
    })
}
