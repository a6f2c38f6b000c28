// The identity provider the sign-in tests run: oidc-provider (a certified OpenID Connect
// provider) with its development login pages, on 127.0.0.1 (or the host the settings name,
// over https when they give a certificate). Test-only: no real keys, no real users.
//
//   node provider.mjs SETTINGS.json
//
// SETTINGS: {"host": "127.0.0.1", "port": 0,
//            "tls": {"cert": "cert.pem", "key": "key.pem"},   (optional: serve https)
//            "clients": [{"client_id", "client_secret", "redirect_uris"}],
//            "users_file": "users.json"}
// users.json: {"alice": {"email": "...", "email_verified": true, "groups": ["SRE"]}, ...}
// read at every sign-in, so a test changes someone's groups by rewriting it. The login page
// takes any password for a user the file has. Consent is given at once, as for a first-party
// client. Once listening, it prints `listening on <issuer>` on stdout.

import { readFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import Provider from 'oidc-provider';

const settings = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const users = () => JSON.parse(readFileSync(settings.users_file, 'utf8'));

const host = settings.host ?? '127.0.0.1';
const server = settings.tls
  ? createHttpsServer({
    cert: readFileSync(settings.tls.cert),
    key: readFileSync(settings.tls.key),
  })
  : createHttpServer();
server.listen(settings.port ?? 0, host, () => {
  const scheme = settings.tls ? 'https' : 'http';
  const issuer = `${scheme}://${host}:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: settings.clients.map((client) => ({
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      ...client,
    })),
    scopes: ['openid', 'email', 'profile', 'groups'],
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name'],
      groups: ['groups'],
    },
    // Claims asked for by scope go into the ID token too (where the portal looks first).
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    features: { devInteractions: { enabled: true } },
    cookies: { keys: ['fz-test-idp-only'] },
    async findAccount(ctx, id) {
      const user = users()[id];
      if (!user) return undefined;
      return { accountId: id, async claims() { return { sub: id, ...user }; } };
    },
    async loadExistingGrant(ctx) {
      const grantId = ctx.oidc.result?.consent?.grantId
        || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
      if (grantId) return ctx.oidc.provider.Grant.find(grantId);
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId,
        accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope('openid email profile groups');
      await grant.save();
      return grant;
    },
  });
  server.on('request', provider.callback());
  console.log(`listening on ${issuer}`);
});
