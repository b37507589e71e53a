# Sourced by the bench scripts, from the repository's root: $TOKEN, an
# unsigned v1.0 token (alg none) for one tenant and app, as the benchmark
# configs in bench/ accept it.
b64() { printf '%s' "$1" | base64 -w0 | tr '+/' '-_' | tr -d '='; }
TOKEN="$(b64 '{"alg":"none","typ":"JWT"}').$(b64 '{"tid":"11111111-2222-3333-4444-555555555555","appid":"aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee","ver":"1.0","aud":"https://api.security.microsoft.com"}').sig"
