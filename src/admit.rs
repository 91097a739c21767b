//! The admit step: may this tenant use this provider? A rejection never reaches the provider.
//!
//! The allow-list is checked here; rate limits and the budget reservation follow in
//! [`crate::policy`], which holds their state.

use crate::policy::AdmitError;
use crate::policy::TenantPolicy;
use crate::provider::Provider;

pub fn admit(policy: &TenantPolicy, idx: usize, provider: &Provider) -> Result<(), AdmitError> {
    if policy.allows(idx) {
        Ok(())
    } else {
        Err(AdmitError::ProviderNotAllowed(provider.name.to_string()))
    }
}
