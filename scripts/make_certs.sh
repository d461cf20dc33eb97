#!/usr/bin/env bash
# Self-signed certificates for a LOCAL TRIAL of a TLS-secured SuperLink (never for production:
# use certificates from your organisation's CA there).
#
#   bash scripts/make_certs.sh [OUT_DIR] [HOST ...]     (default OUT_DIR=certificates, HOST=127.0.0.1 localhost)
#
# Writes OUT_DIR/ca.crt (the CA; give it to SuperNodes and `flwr` as root certificates),
# OUT_DIR/server.pem + OUT_DIR/server.key (the SuperLink's certificate and key, with the hosts
# as subjectAltNames).
set -euo pipefail
OUT="${1:-certificates}"
shift || true
HOSTS=("$@")
[ ${#HOSTS[@]} -eq 0 ] && HOSTS=(127.0.0.1 localhost)
mkdir -p "$OUT"
SAN=""
for h in "${HOSTS[@]}"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then SAN+="IP:$h,"; else SAN+="DNS:$h,"; fi
done
SAN="${SAN%,}"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=adaptsim-local-ca" \
  -keyout "$OUT/ca.key" -out "$OUT/ca.crt" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=${HOSTS[0]}" \
  -keyout "$OUT/server.key" -out "$OUT/server.csr" 2>/dev/null
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$SAN" > "$OUT/server.ext"
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
  -days 30 -extfile "$OUT/server.ext" -out "$OUT/server.pem" 2>/dev/null
rm -f "$OUT/server.csr" "$OUT/server.ext" "$OUT/ca.srl"
chmod 600 "$OUT/ca.key" "$OUT/server.key"
echo "wrote $OUT/ca.crt $OUT/server.pem $OUT/server.key (SAN: $SAN)"
