/**
 * A fixed set of block workers fed in round-robin; results are awaited in submission
 * order by the caller, which keeps the output file sequential.
 */
import { Worker } from 'node:worker_threads';
import { availableParallelism } from 'node:os';
import { BlockEncoder, type EncodeOptions } from './block-codec.js';
import { processBatch, type BatchRequest, type BatchResult } from './block-batch.js';

// Under the test runner the sources run as .ts through a loader that workers inherit.
const workerUrl = new URL(import.meta.url.endsWith('.ts') ? './block-worker.ts' : './block-worker.js', import.meta.url);

/** A block worker with another role than encoding (see block-worker.ts), e.g. a collapse's read-back. */
export function startBlockWorker(workerData: { role: string } & Record<string, unknown>): Worker {
  return new Worker(workerUrl, { workerData });
}

/** What a backup needs from its encoders: run a batch, close. */
export interface BatchRunner {
  run(req: BatchRequest): Promise<BatchResult>;
  close(): Promise<void>;
}

/**
 * Encodes on the calling thread: for tiny sources and long in-process simulations, where
 * starting workers costs more than the work.
 */
export class InlineRunner implements BatchRunner {
  private readonly encoder: BlockEncoder;
  constructor(private readonly opts: EncodeOptions) {
    this.encoder = new BlockEncoder(opts);
  }
  async run(req: BatchRequest): Promise<BatchResult> {
    return processBatch(req, this.opts, this.encoder);
  }
  async close(): Promise<void> {}
}

/** Workers for `size` > 0 (default: one per core), else the calling thread. */
export function batchRunner(opts: EncodeOptions, size?: number): BatchRunner {
  return size === 0 ? new InlineRunner(opts) : new WorkerPool(opts, size);
}

export class WorkerPool implements BatchRunner {
  private readonly workers: Worker[];
  private readonly pending = new Map<number, { resolve: (r: BatchResult) => void; reject: (e: Error) => void }>();
  private next = 0;
  private failed: Error | null = null;

  constructor(opts: EncodeOptions, size = Math.max(1, availableParallelism())) {
    this.workers = Array.from({ length: size }, () => {
      const w = new Worker(workerUrl, { workerData: opts });
      w.on('message', (r: BatchResult) => {
        const p = this.pending.get(r.id);
        this.pending.delete(r.id);
        p?.resolve(r);
      });
      w.on('error', (e) => this.fail(e));
      w.on('exit', (code) => {
        if (code !== 0) this.fail(new Error(`block worker exited with code ${code}`));
      });
      return w;
    });
  }

  private fail(e: Error): void {
    this.failed = e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  run(req: BatchRequest): Promise<BatchResult> {
    if (this.failed) return Promise.reject(this.failed);
    return new Promise((resolve, reject) => {
      this.pending.set(req.id, { resolve, reject });
      const w = this.workers[this.next++ % this.workers.length]!;
      w.postMessage(req, [req.data.buffer as ArrayBuffer]);
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
