/**
 * RandomAccessFile over an SFTP handle, pipelined.
 *
 * One SFTP request at a time is bound by the round trip: ssh2 writes of 1 MiB one after
 * another reach ≈ 11 MB/s on loopback, 16 writes of 256 KiB in flight ≈ 310 MB/s
 * (../shared/reference/hosts.md). So writes are write-behind: `write` cuts the data into
 * requests no larger than ssh2 sends as one packet (larger ones ssh2 splits and sends
 * serially), issues them while fewer than `window` (16) are in flight, and returns as soon
 * as the last one is issued. ssh2 copies the payload into its packet when the request is
 * issued, so the caller may reuse its buffer when `write` returns. A failed queued write is
 * kept and thrown by the next call, and by `flush` and `close`; the file is unusable after.
 *
 * Ordering: the SFTP drafts let a server reorder requests; OpenSSH's sftp-server happens to
 * run them one by one in arrival order, but we do not rely on it. A read waits for earlier
 * overlapping writes, a write for earlier overlapping reads and writes ("earlier" by call,
 * awaited or not), so results follow call order; `size`, `truncate` and `flush` wait for
 * all writes, `close` for everything. Operations on disjoint ranges do not wait for each
 * other. Reads are cut the same way and run up to `window` requests at once.
 *
 * A lost connection fails every queued and waiting operation at once with SSH_CLOSED
 * (SshConnection rejects its outstanding requests), so nothing waits forever.
 */
import type { OpenMode, Stats } from 'ssh2';
import { SshError } from './errors.js';
import type { SshConnection } from './connection.js';
import type { RandomAccessFile } from '../types.js';
import { UsageError } from '../errors.js';

export type SftpOpenMode = 'r' | 'r+' | 'w' | 'wx';

export interface SftpFileOptions {
  /** Requests in flight at once. Default 16. */
  window?: number;
  /** Largest request, bytes; capped by what ssh2 sends as one packet. Default 256 KiB. */
  chunkSize?: number;
}

const DEFAULT_WINDOW = 16;
const DEFAULT_CHUNK = 256 * 1024;
/** SFTP status "Failure": what sftp-server answers for EEXIST, among others. */
const SFTP_FAILURE = 4;
/** ssh2's request size for non-OpenSSH servers, our floor if its private limit is unreadable. */
const SAFE_CHUNK = 32 * 1024;

/** LocalFile's flags, in SFTP terms (ssh2 parses fs-style flag strings). */
const OPEN_FLAGS: Record<SftpOpenMode, OpenMode> = { r: 'r', 'r+': 'r+', w: 'w+', wx: 'xw+' };

/** A read or write call, from the moment it is made until its last request is answered. */
interface Op {
  /** Call order: an operation waits only for earlier operations it conflicts with. */
  seq: number;
  kind: 'read' | 'write';
  offset: number;
  end: number;
}

export class SftpFile implements RandomAccessFile {
  /** Reads and writes called and not yet completely answered, including ones still waiting to be issued. */
  private readonly ops = new Set<Op>();
  /** Write requests sent and not yet answered (bounded by `window`). */
  private inFlight = 0;
  private seq = 0;
  private wakeups: Array<() => void> = [];
  private failure: SshError | null = null;
  private closed = false;
  private readonly unsubscribe: () => void;
  private readonly writeChunk: number;
  private readonly readChunk: number;
  /** True when ssh2 might keep a reference to our payload past the call: copy it first. */
  private readonly copyPayload: boolean;

  private constructor(
    private readonly conn: SshConnection,
    readonly path: string,
    private readonly handle: Buffer,
    private readonly mode: SftpOpenMode,
    private readonly window: number,
    chunkSize: number,
  ) {
    const maxWrite = conn.maxWriteLength;
    const maxRead = conn.maxReadLength;
    this.copyPayload = maxWrite === null;
    this.writeChunk = chunkFor(chunkSize, maxWrite ?? chunkSize);
    this.readChunk = chunkFor(chunkSize, maxRead ?? SAFE_CHUNK);
    // A lost connection fails the file at once and wakes every waiter, so nothing hangs.
    this.unsubscribe = conn.onClose((e) => {
      this.failure ??= e;
      this.wake();
    });
  }

  static async open(conn: SshConnection, path: string, mode: SftpOpenMode = 'r', options: SftpFileOptions = {}): Promise<SftpFile> {
    const window = options.window ?? DEFAULT_WINDOW;
    const chunkSize = options.chunkSize ?? DEFAULT_CHUNK;
    if (!Number.isInteger(window) || window < 1) throw new UsageError(`SFTP window must be a positive integer, not ${window}`);
    if (!Number.isInteger(chunkSize) || chunkSize < 512) throw new UsageError(`SFTP chunk size must be an integer ≥ 512, not ${chunkSize}`);
    let handle: Buffer;
    try {
      handle = await conn.call<Buffer>(`open ${path} (${mode})`, (done) => conn.sftp.open(path, OPEN_FLAGS[mode], done));
    } catch (e) {
      if (mode === 'wx' && e instanceof SshError && e.code === 'SSH_IO' && e.details.status === SFTP_FAILURE) {
        throw new SshError('SSH_IO', `${e.message} (does ${path} exist already?)`, e.details);
      }
      throw e;
    }
    return new SftpFile(conn, path, handle, mode, window, chunkSize);
  }

  async size(): Promise<number> {
    await this.drain();
    const st = await this.conn.call<Stats>(`fstat ${this.path}`, (done) => this.conn.sftp.fstat(this.handle, done));
    return st.size;
  }

  async read(into: Uint8Array, at: number): Promise<void> {
    this.checkRange(into.length, at, 'read');
    this.check();
    if (into.length === 0) return;
    const op: Op = { seq: this.seq++, kind: 'read', offset: at, end: at + into.length };
    this.ops.add(op);
    try {
      await this.readOp(op, into);
    } finally {
      this.ops.delete(op);
      this.wake();
    }
  }

  private async readOp(op: Op, into: Uint8Array): Promise<void> {
    const at = op.offset;
    await this.waitUntil(() => this.failure !== null || !this.conflictsWithEarlier(op));
    this.check();
    const buf = Buffer.from(into.buffer, into.byteOffset, into.byteLength);
    let next = 0;
    let eof: number | null = null;
    let broken = false;
    const worker = async (): Promise<void> => {
      while (next < buf.length && eof === null && !broken) {
        const start = next;
        const length = Math.min(this.readChunk, buf.length - start);
        next += length;
        let done = 0;
        while (done < length) {
          const n = await this.conn
            .call<number>(`read ${length - done} bytes at ${at + start + done} of ${this.path}`, (cb) =>
              this.conn.sftp.read(this.handle, buf, start + done, length - done, at + start + done, cb))
            .catch((e: unknown) => {
              broken = true;
              throw e;
            });
          if (n === 0) {
            eof = Math.min(eof ?? Infinity, start + done);
            return;
          }
          done += n;
        }
      }
    };
    const workers = Math.min(this.window, Math.ceil(buf.length / this.readChunk));
    // Settle every worker before returning, so no request still writes into `into` after we do.
    const results = await Promise.allSettled(Array.from({ length: workers }, worker));
    const rejected = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (rejected) throw rejected.reason;
    if (eof !== null) {
      throw new RangeError(`${this.path}: read of ${into.length} bytes at ${at} passes the end of the file after ${eof} bytes`);
    }
  }

  async write(from: Uint8Array, at: number): Promise<void> {
    this.checkRange(from.length, at, 'write');
    if (this.mode === 'r') throw new UsageError(`${this.path} was opened read-only; cannot write ${from.length} bytes at ${at}`);
    this.check();
    if (from.length === 0) return;
    // Registered before the first await, so a read or write called after this one (even
    // without awaiting it) is ordered after it.
    const op: Op = { seq: this.seq++, kind: 'write', offset: at, end: at + from.length };
    this.ops.add(op);
    let outstanding = 0;
    let issuedAll = false;
    const settle = (): void => {
      if (issuedAll && outstanding === 0) this.ops.delete(op);
      this.wake();
    };
    try {
      await this.waitUntil(() => this.failure !== null || !this.conflictsWithEarlier(op));
      const view = Buffer.from(from.buffer, from.byteOffset, from.byteLength);
      for (let start = 0; start < view.length; start += this.writeChunk) {
        await this.waitUntil(() => this.failure !== null || this.inFlight < this.window);
        this.check();
        const end = Math.min(start + this.writeChunk, view.length);
        const payload = this.copyPayload ? Buffer.from(view.subarray(start, end)) : view.subarray(start, end);
        const offset = at + start;
        this.inFlight++;
        outstanding++;
        this.conn
          .call<void>(`write ${payload.length} bytes at ${offset} of ${this.path}`, (done) =>
            this.conn.sftp.write(this.handle, payload, 0, payload.length, offset, (err) => done(err, undefined)))
          .catch((e: SshError) => {
            // SFTP v3 has no ENOSPC or EIO: sftp-server reports them as the bare "Failure".
            const hint = e.details.status === SFTP_FAILURE ? ' (the host gives no reason: a full filesystem or an I/O error)' : '';
            this.failure ??= hint ? new SshError(e.code, e.message + hint, e.details) : e;
          })
          .finally(() => {
            this.inFlight--;
            outstanding--;
            settle();
          });
      }
    } finally {
      issuedAll = true;
      settle();
    }
  }

  /**
   * When no queued write ends past `size`, the truncate is sent at once and answered later,
   * like a write: the server handles requests in the order they arrive, so every later read
   * or write sees the new size, and no queued write can land past it. A disk growing block
   * by block (VHDX, VHD, qcow2 extend their file per new block) then keeps its pipeline full
   * instead of draining it at each block. Otherwise it waits for the queued writes first.
   */
  async truncate(size: number): Promise<void> {
    this.checkRange(0, size, 'truncate');
    this.check();
    let behind = true;
    for (const o of this.ops) if (o.kind === 'write' && o.end > size) behind = false;
    if (!behind) {
      await this.drain();
      await this.conn.call<void>(`truncate ${this.path} to ${size}`, (done) =>
        this.conn.sftp.fsetstat(this.handle, { size }, (err) => done(err, undefined)));
      return;
    }
    // Everything from the new end on is this operation's until the server answers.
    const op: Op = { seq: this.seq++, kind: 'write', offset: size, end: Number.MAX_SAFE_INTEGER };
    this.ops.add(op);
    this.conn
      .call<void>(`truncate ${this.path} to ${size}`, (done) => this.conn.sftp.fsetstat(this.handle, { size }, (err) => done(err, undefined)))
      .catch((e: SshError) => {
        this.failure ??= e;
      })
      .finally(() => {
        this.ops.delete(op);
        this.wake();
      });
  }

  /** Waits for every queued write, then fsync@openssh.com (skipped, with one warning, if the server lacks it). */
  async flush(): Promise<void> {
    await this.drain();
    if (!this.conn.hasExtension('fsync@openssh.com')) {
      this.conn.warnOnce('fsync', `${this.conn.label}: the SFTP server has no fsync@openssh.com; written data reaches the host but is not forced to its disk`);
      return;
    }
    await this.conn.call<void>(`fsync ${this.path}`, (done) => this.conn.sftp.ext_openssh_fsync(this.handle, (err) => done(err, undefined)));
  }

  /** Waits for queued writes (and reads), closes the handle, then throws the first write failure if there was one. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.waitUntil(() => this.ops.size === 0);
    this.closed = true;
    this.unsubscribe();
    if (!this.conn.closed) {
      try {
        await this.conn.call<void>(`close ${this.path}`, (done) => this.conn.sftp.close(this.handle, (err) => done(err, undefined)));
      } catch (e) {
        this.failure ??= e as SshError;
      }
    }
    if (this.failure) throw this.failure;
  }

  /** Throws the kept failure (a lost write, a lost connection) or a use after close. */
  private check(): void {
    if (this.failure) throw this.failure;
    if (this.closed) throw new UsageError(`${this.path} is closed`);
  }

  /** Waits until every write called so far is answered; throws if one failed. */
  private async drain(): Promise<void> {
    this.check();
    await this.waitUntil(() => !this.hasWrites());
    this.check();
  }

  /**
   * Resolves once `ready()` holds. Terminates: every request in flight settles, by the
   * server's answer or by the connection's close rejecting it, and each settling wakes us.
   */
  private async waitUntil(ready: () => boolean): Promise<void> {
    while (!ready()) await new Promise<void>((resolve) => this.wakeups.push(resolve));
  }

  private wake(): void {
    const w = this.wakeups;
    this.wakeups = [];
    for (const resolve of w) resolve();
  }

  /** An earlier operation on an overlapping range that `op` must not overtake: any write, or a read when `op` writes. */
  private conflictsWithEarlier(op: Op): boolean {
    for (const o of this.ops) {
      if (o.seq < op.seq && (o.kind === 'write' || op.kind === 'write') && o.offset < op.end && op.offset < o.end) return true;
    }
    return false;
  }

  private hasWrites(): boolean {
    for (const o of this.ops) if (o.kind === 'write') return true;
    return false;
  }

  private checkRange(length: number, at: number, what: string): void {
    if (!Number.isSafeInteger(at) || at < 0 || !Number.isSafeInteger(at + length)) {
      throw new RangeError(`${this.path}: ${what} at offset ${at} (length ${length}) is not a valid file offset`);
    }
  }
}

/** The request size: the asked size, capped by ssh2's one-packet limit, rounded down to 4 KiB when that is possible. */
function chunkFor(wanted: number, limit: number): number {
  const c = Math.min(wanted, limit);
  return c >= 4096 ? c - (c % 4096) : c;
}
