/**
 * The one error class of the SSH transport. The code says which failure it was, so callers
 * (HeadStart, the CLI) can tell a host key to pin from a key to authorise from a host that is
 * down; the message is one line that names the host and says what to do.
 */
import { ImagekeepError } from '../errors.js';

export type SshErrorCode =
  /** The server's host key is not pinned in known_hosts, differs from the pin, or is revoked. */
  | 'SSH_HOST_KEY'
  /** The server refused our user key. */
  | 'SSH_AUTH'
  /** Our private key cannot be read or parsed (missing file, wrong passphrase). */
  | 'SSH_KEY'
  /** No TCP connection: refused, unreachable, name does not resolve. */
  | 'SSH_CONNECT'
  /** The handshake did not finish in time. */
  | 'SSH_TIMEOUT'
  /** The connection ended while an operation needed it. */
  | 'SSH_CLOSED'
  /** The SFTP server answered a file operation with an error. */
  | 'SSH_IO';

export class SshError extends ImagekeepError {
  declare readonly code: SshErrorCode;
  constructor(code: SshErrorCode, message: string, details: Record<string, unknown> = {}) {
    super(code, message, details);
  }
}
