#!/usr/bin/env node
/**
 * One grow-in-place session, as its own process so a crash test can kill it at any durable
 * step (IMAGEKEEP_CRASH_AT=k): opens an existing disk for writing, applies the planned
 * writes of `--seed` (src/devkit/disk-writes.ts), flushing every `--flush-every` writes,
 * and closes it.
 *
 *   node dist/devkit/grow-disk-cli.js <disk> --seed N --count C [--max-length BYTES] [--flush-every K] [--format F]
 */
import { dirname } from 'node:path';
import { Command } from 'commander';
import { formats } from '../formats/drivers.js';
import { DurableFile } from '../formats/durable.js';
import { LocalFile } from '../formats/local-file.js';
import { localOpener } from '../formats/registry.js';
import { planWrites } from './disk-writes.js';

const program = new Command('grow-disk')
  .argument('<disk>')
  .requiredOption('--seed <n>')
  .requiredOption('--count <n>')
  .option('--max-length <bytes>', 'longest write', String(256 * 1024))
  .option('--flush-every <k>', 'flush after every k writes (0: only at close)', '0')
  .option('--format <format>', 'the disk\'s format (probed when absent)')
  .action(async (disk: string, o: { seed: string; count: string; maxLength: string; flushEvery: string; format?: string }) => {
    const file = await LocalFile.open(disk, 'r+');
    const driver = o.format ? formats.get(o.format) : await formats.probe(file);
    if (!driver.openWritable) throw new Error(`${driver.format} disks cannot be grown in place`);
    const opener = localOpener(dirname(disk));
    const writer = await driver.openWritable(new DurableFile(file), async (name, mode) => new DurableFile(await opener(name, mode)));
    const writes = planWrites(Number(o.seed), writer.size, Number(o.count), Number(o.maxLength));
    const every = Number(o.flushEvery);
    for (let i = 0; i < writes.length; i++) {
      await writer.write(writes[i]!.data, writes[i]!.offset);
      if (every > 0 && (i + 1) % every === 0) await writer.flush();
    }
    await writer.close();
  });

program.parseAsync(process.argv).catch((e: unknown) => {
  process.stderr.write(`grow-disk: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exitCode = 1;
});
