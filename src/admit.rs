//! The admit step: may this tenant use this provider? A rejection never reaches the provider.
//!
//! Rate limits and budgets join here (DESIGN §1); today the policy is the provider allow-list.

use crate::config::TenantPolicy;
use crate::error::AdmitError;
use crate::provider::Provider;

pub fn admit(policy: &TenantPolicy, idx: usize, provider: &Provider) -> Result<(), AdmitError> {
    if policy.allows(idx) {
        Ok(())
    } else {
        Err(AdmitError::ProviderNotAllowed(provider.name.to_string()))
    }
}
