/**
 * One SSH connection to a hypervisor host (ssh2), with its SFTP session and `exec`.
 *
 * `connect` returns a ready connection or throws one SshError whose one-line message says
 * what failed and what to do: host key not pinned / changed (SSH_HOST_KEY, with the SHA256
 * fingerprint and the ssh-keyscan line that pins it), key refused (SSH_AUTH), connection
 * refused or unreachable (SSH_CONNECT), no handshake in time (SSH_TIMEOUT). The host key is
 * checked against a known_hosts file before authentication; nothing is ever pinned silently.
 *
 * Every SFTP request goes through `call`, which settles even if the connection dies: ssh2
 * leaves requests issued after its channel closed unanswered forever, so we refuse them
 * up front and reject every outstanding one when the connection closes. Keepalives (every
 * 10 s, 3 unanswered) turn a silently dead peer into a close within about 40 s.
 */
import { readFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import ssh2 from 'ssh2';
import type { ClientChannel, ConnectConfig, SFTPWrapper, ServerHostKeyAlgorithm } from 'ssh2';
import { SshError } from './errors.js';
import { checkHostKey, fingerprint, loadKnownHosts, pinnedKeyTypes } from './known-hosts.js';
import { SftpFile, type SftpFileOptions, type SftpOpenMode } from './sftp-file.js';
import { hostPortLabel } from './target.js';

const { Client, utils } = ssh2;
type SshClient = InstanceType<typeof Client>;

export interface SshConnectOptions {
  host: string;
  /** Default 22. */
  port?: number;
  username: string;
  /** The private key itself (Buffer) or the path of its file (string). */
  privateKey: Buffer | string;
  passphrase?: string;
  /** Default ~/.ssh/known_hosts. A missing file pins nothing: every host is refused. */
  knownHostsPath?: string;
  /** Bound on TCP connect + handshake + authentication + SFTP start. Default 20 s. */
  readyTimeoutMs?: number;
  /** SSH keepalive period; the peer is declared dead after 3 unanswered. Default 10 s; 0 disables. */
  keepaliveIntervalMs?: number;
  /** Where "say it once" warnings go (a server without fsync@openssh.com). Default stderr. */
  onWarning?: (message: string) => void;
}

export interface ExecResult {
  /** Exit status; null when the command was killed by a signal (see `signal`). */
  code: number | null;
  signal?: string;
  stdout: string;
  stderr: string;
}

/** ssh2's default host key preference (Node 20 has Ed25519). */
const HOST_KEY_ALGORITHMS: ServerHostKeyAlgorithm[] = [
  'ssh-ed25519', 'ecdsa-sha2-nistp256', 'ecdsa-sha2-nistp384', 'ecdsa-sha2-nistp521', 'rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa',
];

/** SFTP status code of "no such file" (draft-ietf-secsh-filexfer-02 §7). */
export const SFTP_NO_SUCH_FILE = 2;

export class SshConnection {
  private closedBy: SshError | null = null;
  private readonly pending = new Set<(e: SshError) => void>();
  private readonly closeListeners = new Set<(e: SshError) => void>();
  private readonly warned = new Set<string>();

  private constructor(
    /** `user@host:port`, how messages name this connection. */
    readonly label: string,
    private readonly client: SshClient,
    readonly sftp: SFTPWrapper,
    private readonly onWarning: (message: string) => void,
  ) {
    const lost = (why: string): void => this.markClosed(new SshError('SSH_CLOSED', `connection to ${label} lost: ${why}`, { label }));
    client.on('error', (e: Error) => lost(e.message));
    client.on('end', () => lost('the server closed it'));
    client.on('close', () => lost('the server closed it'));
    sftp.on('error', (e: Error) => lost(`SFTP: ${e.message}`));
    sftp.on('close', () => lost('the SFTP session ended'));
  }

  static async connect(options: SshConnectOptions): Promise<SshConnection> {
    const { host, username } = options;
    const port = options.port ?? 22;
    const endpoint = hostPortLabel(host, port);
    const label = `${username}@${endpoint}`;
    const timeoutMs = options.readyTimeoutMs ?? 20_000;
    const keepalive = options.keepaliveIntervalMs ?? 10_000;

    const keyName = typeof options.privateKey === 'string' ? options.privateKey : 'the given private key';
    let keyBytes: Buffer;
    if (typeof options.privateKey === 'string') {
      try {
        keyBytes = await readFile(options.privateKey);
      } catch (e) {
        throw new SshError('SSH_KEY', `cannot read private key ${options.privateKey}: ${(e as Error).message}`, { path: options.privateKey });
      }
    } else {
      keyBytes = options.privateKey;
    }
    const parsed = utils.parseKey(keyBytes, options.passphrase);
    if (parsed instanceof Error) {
      throw new SshError('SSH_KEY', `cannot use private key ${keyName}: ${parsed.message}`, { path: keyName });
    }
    const userKey = Array.isArray(parsed) ? parsed[0]! : parsed;
    const userKeyText = `${userKey.type} ${fingerprint(userKey.getPublicSSH())}`;

    const known = await loadKnownHosts(options.knownHostsPath ?? join(homedir(), '.ssh', 'known_hosts'));
    // Ask for the pinned key types first, as ssh does: a host with several host keys then
    // shows the one we know, not whichever ssh2 prefers.
    const pinnedAlgorithms = pinnedKeyTypes(known, host, port).flatMap(algorithmsOfKeyType);
    const serverHostKey = [...new Set([...pinnedAlgorithms, ...HOST_KEY_ALGORITHMS])];

    let hostKeyError: SshError | null = null;
    const client = new Client();
    const config: ConnectConfig = {
      host,
      port,
      username,
      privateKey: keyBytes,
      passphrase: options.passphrase,
      readyTimeout: timeoutMs,
      keepaliveInterval: keepalive,
      keepaliveCountMax: 3,
      algorithms: { serverHostKey },
      hostVerifier: (key: Buffer): boolean => {
        hostKeyError = checkHostKey(known, host, port, key);
        return hostKeyError === null;
      },
    };

    const ready = new Promise<SFTPWrapper>((resolve, reject) => {
      let settled = false;
      const fail = (e: SshError): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        client.destroy();
        reject(e);
      };
      const timer = setTimeout(
        () => fail(new SshError('SSH_TIMEOUT', `no SSH session with ${endpoint} within ${timeoutMs} ms (host down, firewalled, or not an SSH server?)`, { host, port })),
        timeoutMs,
      );
      client.once('ready', () => {
        client.sftp((err, sftp) => {
          if (err) return fail(new SshError('SSH_CONNECT', `${label}: the SFTP subsystem is not available: ${err.message}`, { host, port }));
          if (settled) return;
          settled = true;
          clearTimeout(timer);
          resolve(sftp);
        });
      });
      client.on('error', (err: Error & { level?: string; code?: string }) => {
        fail(hostKeyError ?? connectError(err, { host, port, endpoint, label, keyName, userKeyText, timeoutMs }));
      });
      client.once('close', () => fail(new SshError('SSH_CONNECT', `${endpoint} closed the connection during the SSH handshake`, { host, port })));
      try {
        client.connect(config);
      } catch (e) {
        fail(new SshError('SSH_CONNECT', `cannot connect to ${endpoint}: ${(e as Error).message}`, { host, port }));
      }
    });
    const sftp = await ready;
    return new SshConnection(label, client, sftp, options.onWarning ?? ((m) => process.stderr.write(`imagekeep: ${m}\n`)));
  }

  get closed(): boolean {
    return this.closedBy !== null;
  }

  /** Throws the SSH_CLOSED error if the connection has ended. */
  assertOpen(): void {
    if (this.closedBy) throw this.closedBy;
  }

  /** Called once when the connection ends (immediately if it already has); returns an unsubscribe. */
  onClose(listener: (e: SshError) => void): () => void {
    if (this.closedBy) {
      listener(this.closedBy);
      return () => {};
    }
    this.closeListeners.add(listener);
    return () => this.closeListeners.delete(listener);
  }

  /**
   * Runs one SFTP request. `start` issues it with a node-style callback; the promise
   * rejects with SSH_CLOSED if the connection is or becomes closed first, and with SSH_IO
   * (message `label: what: server's reason`, details.status = SFTP status code) if the
   * server answers with an error.
   */
  call<T>(what: string, start: (done: (err: Error | null | undefined, value: T) => void) => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      if (this.closedBy) return reject(this.closedBy);
      const onClose = (e: SshError): void => reject(e);
      this.pending.add(onClose);
      const done = (err: Error | null | undefined, value: T): void => {
        this.pending.delete(onClose);
        if (!err) return resolve(value);
        if (this.closedBy) return reject(this.closedBy);
        const status = (err as Error & { code?: unknown }).code;
        if (err.message === 'No response from server') {
          return reject(new SshError('SSH_CLOSED', `${this.label}: ${what}: the connection ended before the server answered`, { label: this.label }));
        }
        reject(new SshError('SSH_IO', `${this.label}: ${what}: ${err.message}`, { label: this.label, status }));
      };
      try {
        start(done);
      } catch (e) {
        done(e as Error, undefined as T);
      }
    });
  }

  /** Opens a file on the host; modes as LocalFile ('w' creates or truncates, 'wx' creates new). */
  openFile(path: string, mode: SftpOpenMode = 'r', options: SftpFileOptions = {}): Promise<SftpFile> {
    return SftpFile.open(this, path, mode, options);
  }

  /** The server's SFTP extensions (name → version), as announced in its VERSION packet. */
  hasExtension(name: string): boolean {
    const ext = (this.sftp as unknown as { _extensions?: Record<string, string> })._extensions;
    return ext?.[name] !== undefined;
  }

  /**
   * Largest WRITE/READ payload ssh2 sends as one request: 256 KiB − 2 KiB for OpenSSH, or
   * what the server's limits@openssh.com says. Larger requests ssh2 splits and sends one
   * after another, which would serialise our pipeline, so we never issue larger ones.
   * ssh2 keeps these in private fields; `null` if a future ssh2 renames them.
   */
  get maxWriteLength(): number | null {
    const v = (this.sftp as unknown as { _maxWriteLen?: unknown })._maxWriteLen;
    return typeof v === 'number' && v > 0 ? v : null;
  }

  get maxReadLength(): number | null {
    const v = (this.sftp as unknown as { _maxReadLen?: unknown })._maxReadLen;
    return typeof v === 'number' && v > 0 ? v : null;
  }

  /** Reports `message` once per connection per `key`. */
  warnOnce(key: string, message: string): void {
    if (this.warned.has(key)) return;
    this.warned.add(key);
    this.onWarning(message);
  }

  /** Runs a command on the host (through its login shell) and collects its output. */
  exec(command: string, options: { input?: string | Buffer } = {}): Promise<ExecResult> {
    return new Promise<ExecResult>((resolve, reject) => {
      if (this.closedBy) return reject(this.closedBy);
      let channel: ClientChannel | undefined;
      const onClose = (e: SshError): void => {
        channel?.destroy();
        reject(e);
      };
      this.pending.add(onClose);
      const fail = (e: Error): void => {
        this.pending.delete(onClose);
        reject(new SshError('SSH_IO', `${this.label}: cannot run "${command}": ${e.message}`, { label: this.label, command }));
      };
      try {
        this.client.exec(command, (err, ch) => {
          if (err) return fail(err);
          channel = ch;
          const out: Buffer[] = [];
          const errOut: Buffer[] = [];
          let code: number | null = null;
          let signal: string | undefined;
          ch.on('data', (d: Buffer) => out.push(d));
          ch.stderr.on('data', (d: Buffer) => errOut.push(d));
          ch.on('exit', (c: number | null, s?: string) => {
            code = c;
            if (s) signal = s;
          });
          ch.on('close', () => {
            this.pending.delete(onClose);
            if (this.closedBy) return reject(this.closedBy);
            const result: ExecResult = { code, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(errOut).toString('utf8') };
            if (signal !== undefined) result.signal = signal;
            resolve(result);
          });
          ch.end(options.input);
        });
      } catch (e) {
        fail(e as Error);
      }
    });
  }

  /** Ends the connection. Open SftpFiles fail from then on; close them first. */
  async close(): Promise<void> {
    if (this.closedBy) return;
    const closed = new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.client.destroy();
        resolve();
      }, 5_000);
      this.client.once('close', () => {
        clearTimeout(timer);
        resolve();
      });
    });
    this.markClosed(new SshError('SSH_CLOSED', `connection to ${this.label} was closed`, { label: this.label }));
    this.client.end();
    await closed;
  }

  private markClosed(e: SshError): void {
    if (this.closedBy) return;
    this.closedBy = e;
    for (const reject of this.pending) reject(e);
    this.pending.clear();
    for (const listener of this.closeListeners) listener(e);
    this.closeListeners.clear();
  }
}

/** The algorithms that present a key of a known_hosts key type. */
function algorithmsOfKeyType(type: string): ServerHostKeyAlgorithm[] {
  if (type === 'ssh-rsa') return ['rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa'];
  return (HOST_KEY_ALGORITHMS as string[]).includes(type) ? [type as ServerHostKeyAlgorithm] : [];
}

interface ConnectContext {
  host: string;
  port: number;
  endpoint: string;
  label: string;
  keyName: string;
  userKeyText: string;
  timeoutMs: number;
}

function connectError(err: Error & { level?: string; code?: string }, c: ConnectContext): SshError {
  const d = { host: c.host, port: c.port, cause: err.message };
  if (err.level === 'client-authentication') {
    return new SshError('SSH_AUTH',
      `${c.label} refused key authentication with ${c.keyName} (${c.userKeyText}); add its public key to ~${c.label.split('@')[0]}/.ssh/authorized_keys on the host`, d);
  }
  if (err.level === 'client-timeout') {
    return new SshError('SSH_TIMEOUT', `no SSH handshake from ${c.endpoint} within ${c.timeoutMs} ms (is it an SSH server?)`, d);
  }
  switch (err.code) {
    case 'ECONNREFUSED':
      return new SshError('SSH_CONNECT', `cannot connect to ${c.endpoint}: connection refused (is sshd running and listening on port ${c.port}?)`, d);
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return new SshError('SSH_CONNECT', `cannot connect to ${c.endpoint}: host name "${c.host}" does not resolve`, d);
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
    case 'ETIMEDOUT':
      return new SshError('SSH_CONNECT', `cannot connect to ${c.endpoint}: host unreachable (${err.code})`, d);
    case 'ECONNRESET':
      return new SshError('SSH_CONNECT', `${c.endpoint} reset the connection during the SSH handshake (sshd refusing this client, e.g. MaxStartups or AllowUsers?)`, d);
  }
  return new SshError('SSH_CONNECT', `cannot connect to ${c.endpoint}: ${err.message}`, d);
}
