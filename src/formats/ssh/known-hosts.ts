/**
 * Host key pinning against an OpenSSH known_hosts file, the way `ssh` with
 * StrictHostKeyChecking=yes does it: a key is accepted only if a line for this host carries
 * exactly that key. Unknown, changed and revoked keys are refused with one line naming the
 * host, the key type and its SHA256 fingerprint, and saying how to pin it.
 *
 * Lines understood (sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT"): `[marker] hostpatterns keytype
 * base64key [comment]`. Host patterns are comma-separated, with `*`/`?` wildcards and `!`
 * negation; a non-default port is written `[host]:port`; hashed names are
 * `|1|base64(salt)|base64(HMAC-SHA1(salt, name))`. `@revoked` refuses a key anywhere it
 * appears; `@cert-authority` lines are skipped (we do not verify host certificates).
 */
import { createHash, createHmac } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { SshError } from './errors.js';
import { hostPortLabel } from './target.js';

export interface KnownHostEntry {
  marker: '' | '@revoked' | '@cert-authority';
  patterns: string;
  keyType: string;
  /** The key blob: SSH wire format, type string first. */
  key: Buffer;
  /** 1-based line number in the file. */
  line: number;
}

export interface KnownHosts {
  path: string;
  /** False when the file does not exist (every key is then unknown). */
  exists: boolean;
  entries: KnownHostEntry[];
}

export async function loadKnownHosts(path: string): Promise<KnownHosts> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { path, exists: false, entries: [] };
    throw new SshError('SSH_HOST_KEY', `cannot read known_hosts file ${path}: ${(e as Error).message}`, { path });
  }
  return { path, exists: true, entries: parseKnownHosts(text) };
}

/** Lines that do not parse (wrong field count, bad base64) are skipped, as ssh does. */
export function parseKnownHosts(text: string): KnownHostEntry[] {
  const entries: KnownHostEntry[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const fields = lines[i]!.trim().split(/\s+/);
    if (fields[0] === '' || fields[0]!.startsWith('#')) continue;
    let marker: KnownHostEntry['marker'] = '';
    if (fields[0] === '@revoked' || fields[0] === '@cert-authority') marker = fields.shift() as KnownHostEntry['marker'];
    if (fields.length < 3) continue;
    const [patterns, keyType, b64] = fields as [string, string, string];
    const key = Buffer.from(b64, 'base64');
    if (key.length < 4 || blobKeyType(key) !== keyType) continue;
    entries.push({ marker, patterns, keyType, key, line: i + 1 });
  }
  return entries;
}

/** The name a host has in known_hosts: `host` on port 22, `[host]:port` otherwise. */
export function knownHostsName(host: string, port: number): string {
  return port === 22 ? host : `[${host}]:${port}`;
}

/** `SHA256:` + unpadded base64 of the blob's SHA-256, as `ssh-keygen -l` prints it. */
export function fingerprint(key: Buffer): string {
  return 'SHA256:' + createHash('sha256').update(key).digest('base64').replace(/=+$/, '');
}

/** The type string at the start of an SSH public key blob, or '' if the blob is malformed. */
export function blobKeyType(key: Buffer): string {
  if (key.length < 4) return '';
  const n = key.readUInt32BE(0);
  if (n > 64 || 4 + n > key.length) return '';
  return key.toString('latin1', 4, 4 + n);
}

/** Does one host-pattern field of a line name `name`? */
export function matchesHost(patterns: string, name: string): boolean {
  if (patterns.startsWith('|1|')) return matchesHashed(patterns, name);
  let positive = false;
  for (const raw of patterns.split(',')) {
    const negated = raw.startsWith('!');
    const pattern = negated ? raw.slice(1) : raw;
    if (!wildcardMatch(pattern.toLowerCase(), name.toLowerCase())) continue;
    if (negated) return false;
    positive = true;
  }
  return positive;
}

function matchesHashed(field: string, name: string): boolean {
  const parts = field.split('|'); // ['', '1', salt, hash]
  if (parts.length !== 4) return false;
  const salt = Buffer.from(parts[2]!, 'base64');
  const want = Buffer.from(parts[3]!, 'base64');
  const got = createHmac('sha1', salt).update(name).digest();
  return want.length === got.length && want.equals(got);
}

function wildcardMatch(pattern: string, text: string): boolean {
  // Iterative glob with backtracking to the last '*': linear enough for host names.
  let p = 0;
  let t = 0;
  let star = -1;
  let mark = 0;
  while (t < text.length) {
    if (p < pattern.length && (pattern[p] === '?' || pattern[p] === text[t])) {
      p++;
      t++;
    } else if (p < pattern.length && pattern[p] === '*') {
      star = p++;
      mark = t;
    } else if (star >= 0) {
      p = star + 1;
      t = ++mark;
    } else {
      return false;
    }
  }
  while (pattern[p] === '*') p++;
  return p === pattern.length;
}

/** The key types pinned for a host, in file order: the algorithms to ask the server for first. */
export function pinnedKeyTypes(known: KnownHosts, host: string, port: number): string[] {
  const name = knownHostsName(host, port);
  const types: string[] = [];
  for (const e of known.entries) {
    if (e.marker === '' && matchesHost(e.patterns, name) && !types.includes(e.keyType)) types.push(e.keyType);
  }
  return types;
}

/**
 * Accepts `key` for host:port or returns the SshError that refuses it. A key listed under
 * `@revoked` is refused for every host.
 */
export function checkHostKey(known: KnownHosts, host: string, port: number, key: Buffer): SshError | null {
  const name = knownHostsName(host, port);
  const label = hostPortLabel(host, port);
  const type = blobKeyType(key) || 'unknown-type';
  const fp = fingerprint(key);
  const details = { host, port, keyType: type, fingerprint: fp, knownHosts: known.path };

  const revoked = known.entries.find((e) => e.marker === '@revoked' && e.key.equals(key));
  if (revoked) {
    return new SshError('SSH_HOST_KEY',
      `host key of ${label} (${type} ${fp}) is marked @revoked in ${known.path} line ${revoked.line}; refusing to connect`, details);
  }
  const forHost = known.entries.filter((e) => e.marker === '' && matchesHost(e.patterns, name));
  if (forHost.some((e) => e.key.equals(key))) return null;

  const keyscan = `ssh-keyscan ${port === 22 ? '' : `-p ${port} `}-t ${keyscanType(type)} ${host} >> ${known.path}`;
  const sameType = forHost.find((e) => e.keyType === type);
  if (sameType) {
    return new SshError('SSH_HOST_KEY',
      `host key of ${label} CHANGED: it offers ${type} ${fp} but ${known.path} line ${sameType.line} pins ${fingerprint(sameType.key)}; ` +
      `if the host was reinstalled on purpose, check the new fingerprint on the host, then: ssh-keygen -R '${name}' -f ${known.path} && ${keyscan}`,
      { ...details, pinned: fingerprint(sameType.key), line: sameType.line });
  }
  if (forHost.length > 0) {
    return new SshError('SSH_HOST_KEY',
      `host key of ${label} is not the pinned one: it offers ${type} ${fp} but ${known.path} pins only ` +
      `${[...new Set(forHost.map((e) => e.keyType))].join(', ')} for it; check the fingerprint on the host, then pin it: ${keyscan}`, details);
  }
  const where = known.exists ? `not in ${known.path}` : `${known.path} does not exist`;
  return new SshError('SSH_HOST_KEY',
    `unknown host key for ${label}: ${type} ${fp} (${where}); check the fingerprint on the host (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), then pin it: ${keyscan}`,
    details);
}

/** ssh-keyscan's -t names: ed25519, ecdsa, rsa, dsa. */
function keyscanType(type: string): string {
  if (type.startsWith('ecdsa-')) return 'ecdsa';
  const names: Record<string, string> = { 'ssh-ed25519': 'ed25519', 'ssh-rsa': 'rsa', 'ssh-dss': 'dsa' };
  return names[type] ?? type;
}

/** A known_hosts line pinning `key` for host:port (plain name, as ssh-keyscan writes it). */
export function knownHostsLine(host: string, port: number, key: Buffer): string {
  return `${knownHostsName(host, port)} ${blobKeyType(key)} ${key.toString('base64')}`;
}
