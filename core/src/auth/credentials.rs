//! The credential a request carries: `Authorization: Bearer <key or JWT>` or
//! `X-API-Key: <key>` (HTTP headers, or the same names as gRPC metadata).

use super::error::Reason;
use http::HeaderMap;
use http::header::AUTHORIZATION;

const X_API_KEY: &str = "x-api-key";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    /// `Authorization: Bearer ...`: an API key or a JWT.
    Bearer(&'a str),
    /// `X-API-Key: ...`: an API key only.
    ApiKey(&'a str),
}

impl<'a> Credential<'a> {
    /// The credential of a request; `Authorization` wins when both are sent.
    pub fn from_headers(headers: &'a HeaderMap) -> Result<Credential<'a>, Reason> {
        if let Some(value) = headers.get(AUTHORIZATION) {
            let value = value
                .to_str()
                .map_err(|_| Reason::Malformed("Authorization is not visible ASCII"))?;
            let (scheme, token) = value
                .split_once(' ')
                .ok_or(Reason::Malformed("Authorization has no scheme"))?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(Reason::Malformed("Authorization scheme is not Bearer"));
            }
            let token = token.trim();
            if token.is_empty() {
                return Err(Reason::Malformed("empty Bearer token"));
            }
            return Ok(Credential::Bearer(token));
        }
        if let Some(value) = headers.get(X_API_KEY) {
            let key = value
                .to_str()
                .map_err(|_| Reason::Malformed("X-API-Key is not visible ASCII"))?
                .trim();
            if key.is_empty() {
                return Err(Reason::Malformed("empty X-API-Key"));
            }
            return Ok(Credential::ApiKey(key));
        }
        Err(Reason::NoCredential)
    }

    /// The secret itself, to compare with the configured keys.
    pub fn secret(&self) -> &'a str {
        match self {
            Credential::Bearer(s) | Credential::ApiKey(s) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn bearer_and_api_key_headers_are_read() {
        let h = headers(&[("authorization", "Bearer abc.def")]);
        assert_eq!(
            Credential::from_headers(&h),
            Ok(Credential::Bearer("abc.def"))
        );
        let h = headers(&[("authorization", "bearer   k1  ")]);
        assert_eq!(Credential::from_headers(&h), Ok(Credential::Bearer("k1")));
        let h = headers(&[("X-API-Key", "k2")]);
        assert_eq!(Credential::from_headers(&h), Ok(Credential::ApiKey("k2")));
        let h = headers(&[("x-api-key", "k2"), ("authorization", "Bearer k1")]);
        assert_eq!(Credential::from_headers(&h), Ok(Credential::Bearer("k1")));
    }

    #[test]
    fn missing_or_malformed_headers_are_refused() {
        assert_eq!(
            Credential::from_headers(&HeaderMap::new()),
            Err(Reason::NoCredential)
        );
        for bad in ["Basic dXNlcjpwdw==", "Bearer", "Bearer    ", "k1"] {
            let h = headers(&[("authorization", bad)]);
            assert!(
                matches!(Credential::from_headers(&h), Err(Reason::Malformed(_))),
                "{bad}"
            );
        }
        let h = headers(&[("x-api-key", " ")]);
        assert!(matches!(
            Credential::from_headers(&h),
            Err(Reason::Malformed(_))
        ));
    }
}
