// A relying party made of the npm package openid-client (6.x), which we did not write:
// the tests drive the gateway's OpenID provider through it. One step per run, JSON in
// (stdin) and JSON out (stdout), so the test can play the browser in between:
//
//   start     {issuer, client_id, client_secret?, redirect_uri, scope}
//             -> {url, code_verifier, state, nonce}: discovery, an authorization URL
//                with PKCE S256, state and nonce
//   callback  {..., callback_url, code_verifier, state, nonce}
//             -> {id_token_claims, userinfo, refreshed: {id_token_claims, userinfo},
//                 refresh_token, old_refresh_token, access_token}: the code exchanged,
//                userinfo fetched, the tokens refreshed once and userinfo fetched again
//   refresh   {..., refresh_token} -> {id_token_claims} (a refresh token used again)
//   userinfo  {..., access_token, sub} -> the userinfo answer
//
// Any error prints {error, code, status} and exits 0: refusals are what some tests want.
// The deployment's CA comes in through NODE_EXTRA_CA_CERTS.
import * as client from './node/node_modules/openid-client/build/index.js';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const input = JSON.parse(Buffer.concat(chunks).toString('utf8'));
const step = process.argv[2];

async function configuration() {
  const auth = input.client_secret
    ? client.ClientSecretBasic(input.client_secret)
    : client.None();
  return client.discovery(new URL(input.issuer), input.client_id, undefined, auth);
}

async function run() {
  const config = await configuration();
  if (step === 'start') {
    const code_verifier = client.randomPKCECodeVerifier();
    const state = client.randomState();
    const nonce = client.randomNonce();
    const url = client.buildAuthorizationUrl(config, {
      redirect_uri: input.redirect_uri,
      scope: input.scope,
      code_challenge: await client.calculatePKCECodeChallenge(code_verifier),
      code_challenge_method: 'S256',
      state,
      nonce,
    });
    return { url: url.href, code_verifier, state, nonce };
  }
  if (step === 'callback') {
    const tokens = await client.authorizationCodeGrant(config, new URL(input.callback_url), {
      pkceCodeVerifier: input.code_verifier,
      expectedState: input.state,
      expectedNonce: input.nonce,
      idTokenExpected: true,
    });
    const claims = tokens.claims();
    const userinfo = await client.fetchUserInfo(config, tokens.access_token, claims.sub);
    const refreshed = await client.refreshTokenGrant(config, tokens.refresh_token);
    const refreshedUserinfo = await client.fetchUserInfo(
      config, refreshed.access_token, claims.sub);
    return {
      id_token_claims: claims,
      id_token: tokens.id_token,
      userinfo,
      access_token: tokens.access_token,
      old_refresh_token: tokens.refresh_token,
      refresh_token: refreshed.refresh_token,
      refreshed: { id_token_claims: refreshed.claims(), userinfo: refreshedUserinfo,
                   access_token: refreshed.access_token },
    };
  }
  if (step === 'refresh') {
    const refreshed = await client.refreshTokenGrant(config, input.refresh_token);
    return { id_token_claims: refreshed.claims(), access_token: refreshed.access_token,
             refresh_token: refreshed.refresh_token };
  }
  if (step === 'userinfo') {
    return await client.fetchUserInfo(config, input.access_token, input.sub);
  }
  throw new Error(`unknown step ${step}`);
}

try {
  console.log(JSON.stringify(await run()));
} catch (err) {
  // A 401 with a WWW-Authenticate challenge is reported by its challenge; the OAuth
  // error code is in the body.
  let error = err.error;
  if (error === undefined && err.response) {
    error = await err.response.clone().json().then((body) => body.error, () => undefined);
  }
  console.log(JSON.stringify({
    error: error ?? err.message, code: err.code ?? null,
    status: err.status ?? err.response?.status ?? null,
  }));
}
