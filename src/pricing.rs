//! Prices and cost: USD per million tokens by provider and model, turned into exact integer
//! nano-dollars per token when the table is loaded, so cost is summed in integers and never
//! accumulated in binary floating point.
//!
//! A model matches its exact name first, then the longest priced name it extends with a `-`
//! (a dated snapshot: `gpt-4o-2024-08-06` → `gpt-4o`, `claude-sonnet-4-20250514` →
//! `claude-sonnet-4`).

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::usage::Usage;
use crate::vocab::FastMap;

/// One model's prices in integer nano-dollars: per token (= USD per million tokens × 1000),
/// per image, per character (= USD per million characters × 1000) and per minute of audio.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Price {
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub output: u64,
    /// Unit prices are optional: a token-priced model (found by a dated-prefix match, say)
    /// must not silently price a unit it has no price for at zero; see [`Price::covers`].
    pub image: Option<u64>,
    pub character: Option<u64>,
    pub audio_minute: Option<u64>,
}

impl Price {
    /// Cost of `u` in nano-dollars. Reasoning tokens are billed as output. Audio is priced per
    /// minute and metered in milliseconds: the product is divided once, rounded to the
    /// nearest nano-dollar, so nothing accumulates in floating point.
    pub fn cost_nanos(&self, u: &Usage) -> u64 {
        let per_minute = u128::from(self.audio_minute.unwrap_or(0));
        let audio = (u128::from(u.audio_ms) * per_minute + 30_000) / 60_000;
        u.input
            .saturating_mul(self.input)
            .saturating_add(u.cached_input.saturating_mul(self.cached_input))
            .saturating_add(u.cache_write.saturating_mul(self.cache_write))
            .saturating_add(
                u.output
                    .saturating_add(u.reasoning)
                    .saturating_mul(self.output),
            )
            .saturating_add(u.images.saturating_mul(self.image.unwrap_or(0)))
            .saturating_add(u.characters.saturating_mul(self.character.unwrap_or(0)))
            .saturating_add(u64::try_from(audio).unwrap_or(u64::MAX))
    }

    /// Whether this price has a price for every unit `u` counted; if not, the request is
    /// unpriced rather than costed at zero.
    pub fn covers(&self, u: &Usage) -> bool {
        (u.images == 0 || self.image.is_some())
            && (u.characters == 0 || self.character.is_some())
            && (u.audio_ms == 0 || self.audio_minute.is_some())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    /// Token prices, USD per million tokens. Required unless a unit price below is given.
    input: Option<f64>,
    output: Option<f64>,
    cached_input: Option<f64>,
    cache_write: Option<f64>,
    /// Image generation, USD per image.
    per_image: Option<f64>,
    /// Text-to-speech, USD per million input characters.
    per_million_characters: Option<f64>,
    /// Transcription, USD per minute of audio.
    per_minute: Option<f64>,
}

/// provider => model => price. Every answered request looks its price up: the tables hash
/// with foldhash, not SipHash (their keys come from the config and the price list, so no
/// client can choose them to collide).
#[derive(Debug, Clone, Default)]
pub struct Pricing {
    providers: FastMap<String, FastMap<String, Price>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("cannot read pricing file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pricing file {path}: {message}")]
    Invalid { path: String, message: String },
}

/// USD per million tokens → nano-dollars per token, exactly for prices with up to 3 decimals
/// (a thousandth of a dollar per million tokens, finer than any published price).
fn nanos(usd_per_million: f64, what: &str) -> Result<u64, String> {
    scaled(usd_per_million, 1000.0, what)
}

/// USD per unit (image, minute) → nano-dollars per unit, exact to 9 decimals.
fn unit_nanos(usd: f64, what: &str) -> Result<u64, String> {
    scaled(usd, 1e9, what)
}

fn scaled(usd: f64, scale: f64, what: &str) -> Result<u64, String> {
    if !usd.is_finite() || !(0.0..=1e6).contains(&usd) {
        return Err(format!("{what}: `{usd}` is not a price in USD"));
    }
    Ok((usd * scale).round() as u64)
}

/// When the compiled-in prices (`config/pricing.yaml`) were taken from the providers' pages.
pub const BUILTIN_TAKEN: &str = "2026-11-25";

static BUILTIN: std::sync::LazyLock<Pricing> = std::sync::LazyLock::new(|| {
    // A unit test parses the same text, so a bad edit fails the build's tests, not a start.
    Pricing::from_yaml(include_str!("../config/pricing.yaml")).unwrap_or_default()
});

impl Pricing {
    /// The compiled-in price table: `config/pricing.yaml` as of [`BUILTIN_TAKEN`].
    pub fn builtin() -> Self {
        BUILTIN.clone()
    }

    /// The compiled-in table with `path`'s entries replacing or adding to it.
    pub fn builtin_with(path: &Path) -> Result<Self, PricingError> {
        let mut p = Self::builtin();
        p.merge(Self::load(path)?);
        Ok(p)
    }

    pub fn load(path: &Path) -> Result<Self, PricingError> {
        let text = std::fs::read_to_string(path).map_err(|source| PricingError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|message| PricingError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let file: HashMap<String, HashMap<String, PriceFile>> =
            serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        let mut providers = FastMap::default();
        for (provider, models) in file {
            let mut table = FastMap::default();
            for (model, p) in models {
                let at = |f: &str| format!("{provider}.{model}.{f}");
                let unit_priced = p.per_image.is_some()
                    || p.per_million_characters.is_some()
                    || p.per_minute.is_some();
                let token_price = |v: Option<f64>, f: &str| match v {
                    Some(v) => nanos(v, &at(f)),
                    // A model billed only per image, character or minute needs no token price.
                    None if unit_priced => Ok(0),
                    None => Err(format!(
                        "{}: missing (a model needs input and output prices, or per_image, per_million_characters or per_minute)",
                        at(f)
                    )),
                };
                let input = token_price(p.input, "input")?;
                let opt = |v: Option<f64>, f: &str, conv: fn(f64, &str) -> Result<u64, String>| {
                    v.map(|v| conv(v, &at(f))).transpose()
                };
                table.insert(
                    model.clone(),
                    Price {
                        input,
                        output: token_price(p.output, "output")?,
                        image: opt(p.per_image, "per_image", unit_nanos)?,
                        character: opt(p.per_million_characters, "per_million_characters", nanos)?,
                        audio_minute: opt(p.per_minute, "per_minute", unit_nanos)?,
                        cached_input: p
                            .cached_input
                            .map(|v| nanos(v, &at("cached_input")))
                            .transpose()?
                            .unwrap_or(input),
                        cache_write: p
                            .cache_write
                            .map(|v| nanos(v, &at("cache_write")))
                            .transpose()?
                            .unwrap_or(input),
                    },
                );
            }
            providers.insert(provider, table);
        }
        Ok(Self { providers })
    }

    /// Entries of `other` replace or add to this table's.
    pub fn merge(&mut self, other: Pricing) {
        for (p, models) in other.providers {
            self.providers.entry(p).or_default().extend(models);
        }
    }

    pub fn price(&self, provider: &str, model: &str) -> Option<Price> {
        let table = self.providers.get(provider)?;
        if let Some(p) = table.get(model) {
            return Some(*p);
        }
        table
            .iter()
            .filter(|(name, _)| {
                model.len() > name.len()
                    && model.starts_with(name.as_str())
                    // `-` before a date or version; `@` before a `model@version` id.
                    && matches!(model.as_bytes()[name.len()], b'-' | b'@')
            })
            .max_by_key(|(name, _)| name.len())
            .map(|(_, p)| *p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "openai:\n  gpt-4o: { input: 2.50, cached_input: 1.25, output: 10.00 }\n  gpt-4o-mini: { input: 0.15, cached_input: 0.075, output: 0.60 }\nanthropic:\n  claude-sonnet-4: { input: 3, cached_input: 0.30, cache_write: 3.75, output: 15 }\n";

    #[test]
    fn a_vertex_version_after_at_matches_its_model() {
        let p =
            Pricing::from_yaml("vertex:\n  claude-sonnet-4-5: { input: 3, output: 15 }\n").unwrap();
        assert!(p.price("vertex", "claude-sonnet-4-5@20250929").is_some());
        assert!(p.price("vertex", "claude-sonnet-4-50").is_none());
    }

    #[test]
    fn exact_then_longest_dated_prefix() {
        let p = Pricing::from_yaml(TABLE).unwrap();
        assert_eq!(p.price("openai", "gpt-4o").unwrap().input, 2500);
        assert_eq!(p.price("openai", "gpt-4o-2024-08-06").unwrap().input, 2500);
        assert_eq!(
            p.price("openai", "gpt-4o-mini-2024-07-18").unwrap().input,
            150
        );
        assert_eq!(
            p.price("anthropic", "claude-sonnet-4-20250514")
                .unwrap()
                .cache_write,
            3750
        );
        assert!(p.price("openai", "gpt-4").is_none());
        assert!(p.price("openai", "gpt-4omni").is_none());
        assert!(p.price("mistral", "gpt-4o").is_none());
    }

    #[test]
    fn cost_is_exact_integer_nanodollars() {
        let p = Pricing::from_yaml(TABLE)
            .unwrap()
            .price("openai", "gpt-4o-mini")
            .unwrap();
        let u = Usage {
            input: 20,
            cached_input: 100,
            output: 20,
            reasoning: 10,
            ..Usage::default()
        };
        // 20×150 + 100×75 + (20+10)×600 nano-dollars
        assert_eq!(p.cost_nanos(&u), 3_000 + 7_500 + 18_000);
        // A million requests of it sum exactly: no float drift.
        let total: u64 = (0..1_000_000).map(|_| p.cost_nanos(&u)).sum();
        assert_eq!(total, 28_500_000_000);
    }

    #[test]
    fn shipped_table_loads_and_azure_shares_openai_prices() {
        // The compiled-in table is this text: it must parse (BUILTIN falls back to empty).
        Pricing::from_yaml(include_str!("../config/pricing.yaml")).unwrap();
        let p = Pricing::builtin();
        assert_eq!(
            p.price("azure", "gpt-4o-2024-11-20"),
            p.price("openai", "gpt-4o")
        );
        assert!(p.price("anthropic", "claude-sonnet-4-20250514").is_some());
        assert!(p.price("gemini", "gemini-2.5-flash").is_some());
        assert!(p.price("deepseek", "deepseek-chat").is_some());
    }

    #[test]
    fn a_pricing_file_overrides_and_extends_the_compiled_in_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prices.yaml");
        std::fs::write(
            &path,
            "openai:\n  gpt-4o-mini: { input: 1, output: 2 }\nacme-llm:\n  house-1: { input: 3, output: 4 }\n",
        )
        .unwrap();
        let p = Pricing::builtin_with(&path).unwrap();
        let mini = p.price("openai", "gpt-4o-mini").unwrap();
        assert_eq!((mini.input, mini.output), (1_000, 2_000), "overridden");
        assert_eq!(
            p.price("acme-llm", "house-1").unwrap().output,
            4_000,
            "added"
        );
        assert_eq!(
            p.price("openai", "gpt-4o"),
            Pricing::builtin().price("openai", "gpt-4o"),
            "the rest stays compiled in"
        );
        assert!(BUILTIN_TAKEN.len() == 10 && BUILTIN_TAKEN.starts_with("20"));
    }

    #[test]
    fn unit_prices_images_characters_minutes() {
        let p = Pricing::from_yaml(
            "openai:\n  dall-e-3: { per_image: 0.04 }\n  tts-1: { per_million_characters: 15 }\n  whisper-1: { per_minute: 0.006 }\n  gpt-image-1: { input: 5, output: 40, per_image: 0 }\n",
        )
        .unwrap();
        let img = p.price("openai", "dall-e-3").unwrap();
        assert_eq!((img.image, img.input, img.output), (Some(40_000_000), 0, 0));
        let u = Usage {
            images: 3,
            ..Usage::default()
        };
        assert_eq!(img.cost_nanos(&u), 120_000_000);
        let tts = p.price("openai", "tts-1").unwrap();
        let u = Usage {
            characters: 1000,
            ..Usage::default()
        };
        // 1000 characters at $15 per million = $0.015.
        assert_eq!(tts.cost_nanos(&u), 15_000_000);
        let stt = p.price("openai", "whisper-1").unwrap();
        let u = Usage {
            audio_ms: 90_500,
            ..Usage::default()
        };
        // 90.5 s at $0.006 per minute = $0.00905.
        assert_eq!(stt.cost_nanos(&u), 9_050_000);
        let gi = p.price("openai", "gpt-image-1").unwrap();
        let u = Usage {
            input: 10,
            output: 1000,
            images: 1,
            ..Usage::default()
        };
        assert_eq!(gi.cost_nanos(&u), 10 * 5000 + 1000 * 40_000);
        // A token price found by prefix does not cover speech characters: unpriced, not free.
        let tp = Pricing::from_yaml(TABLE).unwrap();
        let mini_tts = tp.price("openai", "gpt-4o-mini-tts").unwrap();
        assert!(!mini_tts.covers(&u_chars()));
        assert!(tts.covers(&u_chars()));
        // A model without any price at all is still refused.
        assert!(Pricing::from_yaml("openai:\n  m: { cached_input: 1 }\n").is_err());
    }

    fn u_chars() -> Usage {
        Usage {
            characters: 5,
            ..Usage::default()
        }
    }

    #[test]
    fn bad_prices_are_refused() {
        assert!(Pricing::from_yaml("openai:\n  m: { input: -1, output: 1 }\n").is_err());
        assert!(Pricing::from_yaml("openai:\n  m: { input: 1 }\n").is_err());
        assert!(Pricing::from_yaml("openai:\n  m: { input: 1, output: 1, typo: 2 }\n").is_err());
    }
}
