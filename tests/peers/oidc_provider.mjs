// A real OpenID provider for the tests: the npm package oidc-provider (certified by the
// OpenID Foundation), configured from a JSON file whose path is the first argument:
//
//   { "issuer": "http://127.0.0.1:PORT",   // may differ from where it listens (a proxy)
//     "keys": [JWK with private members, ...],   // the first one of an algorithm signs
//     "clients": [oidc-provider client metadata, ...],
//     "accounts": { "alice": { "preferred_username": "alice", "groups": [...] }, ... },
//     "claims": { "scope": ["claim", ...], ... },
//     "deviceFlow": true }   // the device authorization grant (RFC 8628); default on
//
// It listens on a free port of 127.0.0.1 and prints "listening PORT" once it does. The
// login and consent pages are oidc-provider's own development interactions (any account
// id signs in, as the tests drive them with plain HTTP). Claims of the granted scopes go
// into the ID token as Azure AD and Okta put them there (conformIdTokenClaims: false).
// The device flow's pages (/device: the user code, then login, consent) are its own too.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';

// The package is installed under ./node (its lock file pins it), not next to this file.
const installed = createRequire(new URL('./node/package.json', import.meta.url));
const { default: Provider } = await import(pathToFileURL(installed.resolve('oidc-provider')));

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));

const provider = new Provider(config.issuer, {
  clients: config.clients,
  jwks: { keys: config.keys },
  claims: config.claims,
  conformIdTokenClaims: false,
  cookies: { keys: ['portcullis-test-cookie-key'] },
  features: { devInteractions: { enabled: true },
              deviceFlow: { enabled: config.deviceFlow ?? true } },
  async findAccount(ctx, id) {
    const account = config.accounts[id];
    if (!account) return undefined;
    return { accountId: id, async claims() { return { sub: id, ...account }; } };
  },
});
// The tests ask over plain http on 127.0.0.1: nothing to trust a proxy header for.
provider.proxy = false;

const server = provider.listen(0, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
