"""Identity: OpenID Connect sign-in, bearer tokens, principals and the access policy."""
