/**
 * The `ssh://user@host[:port]/path` form of a remote target (SPEC §10). Parsed by hand rather
 * than with WHATWG URL, which accepts far more than we want (empty users, passwords, queries)
 * and silently normalises paths. Percent escapes are decoded in the user and the path, so a
 * path with a space or a Windows user `DOMAIN\admin` can be written (`%20`, `%5C`).
 */
import { isIPv6 } from 'node:net';
import { UsageError } from '../errors.js';

export interface SshTarget {
  username: string;
  /** A host name, an IPv4 address, or an IPv6 address without brackets. */
  host: string;
  port: number;
  /** Absolute path on the host, decoded. */
  path: string;
}

export const DEFAULT_SSH_PORT = 22;

const HOST_NAME = /^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$/;

export function isSshUrl(text: string): boolean {
  return /^ssh:\/\//i.test(text);
}

export function parseSshTarget(text: string): SshTarget {
  const bad = (why: string): UsageError =>
    new UsageError(`bad SSH target "${text}": ${why}; expected ssh://user@host[:port]/absolute/path`, { target: text });

  if (!isSshUrl(text)) throw bad('it does not start with ssh://');
  const rest = text.slice('ssh://'.length);
  if (/[?#]/.test(rest)) throw bad('"?" and "#" are not allowed (write them as %3F and %23)');

  const slash = rest.indexOf('/');
  if (slash < 0) throw bad('there is no path after the host');
  const authority = rest.slice(0, slash);
  const path = decode(rest.slice(slash), 'path', bad);

  const at = authority.lastIndexOf('@');
  if (at < 0) throw bad('there is no user (user@host)');
  const userPart = authority.slice(0, at);
  if (userPart === '') throw bad('the user is empty');
  if (userPart.includes(':')) throw bad('passwords are not accepted in the target; authenticate with a key');
  const username = decode(userPart, 'user', bad);
  if (username.includes('@')) throw bad('the user contains "@" (write it as %40)');

  const hostPort = authority.slice(at + 1);
  let host: string;
  let portText: string | undefined;
  if (hostPort.startsWith('[')) {
    const close = hostPort.indexOf(']');
    if (close < 0) throw bad('"[" of an IPv6 address is not closed');
    host = hostPort.slice(1, close);
    if (!isIPv6(host)) throw bad(`"${host}" is not an IPv6 address`);
    const after = hostPort.slice(close + 1);
    if (after !== '') {
      if (!after.startsWith(':')) throw bad(`unexpected "${after}" after the IPv6 address`);
      portText = after.slice(1);
    }
  } else {
    const colons = hostPort.split(':').length - 1;
    if (colons > 1) throw bad('an IPv6 address must be written in brackets, e.g. ssh://user@[::1]:22/path');
    const colon = hostPort.indexOf(':');
    host = colon < 0 ? hostPort : hostPort.slice(0, colon);
    portText = colon < 0 ? undefined : hostPort.slice(colon + 1);
    if (host === '') throw bad('the host is empty');
    if (!HOST_NAME.test(host)) throw bad(`"${host}" is not a host name or address`);
  }

  let port = DEFAULT_SSH_PORT;
  if (portText !== undefined) {
    if (!/^[0-9]{1,5}$/.test(portText)) throw bad(`port "${portText}" is not a number`);
    port = Number(portText);
    if (port < 1 || port > 65535) throw bad(`port ${port} is outside 1..65535`);
  }
  return { username, host, port, path };
}

/** The canonical text of a target: brackets around IPv6, the port only when it is not 22. */
export function formatSshTarget(t: SshTarget): string {
  const user = encodeURIComponent(t.username);
  const path = t.path.split('/').map(encodeURIComponent).join('/');
  return `ssh://${user}@${hostPortLabel(t.host, t.port)}${path}`;
}

/** `host`, `host:2222`, `[::1]:2222`: how messages name an endpoint. */
export function hostPortLabel(host: string, port: number): string {
  const h = isIPv6(host) ? `[${host}]` : host;
  return port === DEFAULT_SSH_PORT ? h : `${h}:${port}`;
}

function decode(part: string, what: string, bad: (why: string) => UsageError): string {
  let text: string;
  try {
    text = decodeURIComponent(part);
  } catch {
    throw bad(`the ${what} has a malformed percent escape`);
  }
  if (/[\x00-\x1f\x7f]/.test(text)) throw bad(`the ${what} contains a control character`);
  return text;
}
