/**
 * Fuzzes every disk codec's parser (src/devkit/fuzz.ts): at least 100,000 mutated disks per
 * format by default, seeded from our writers' and qemu-img's small disks. Prints one line
 * per format and every failure; exits 1 if any case failed.
 *
 *   scripts/bench/fuzz [--cases 100000] [--seed 1] [--format vhd]
 */
import { formats } from '../formats/drivers.js';
import { fuzzDriver } from '../devkit/fuzz.js';
import { fuzzSeeds } from '../devkit/fuzz-seeds.js';
import { parseArgs } from './common.js';

const args = parseArgs(process.argv.slice(2));
const cases = Number(args.options.get('cases') ?? 100_000);
const seed = Number(args.options.get('seed') ?? 1);
const only = args.options.get('format');
let failed = 0;
for (const driver of formats.drivers) {
  if (driver.format === 'raw' || (only && driver.format !== only)) continue;
  const seeds = await fuzzSeeds(driver);
  const r = await fuzzDriver(driver, seeds, { cases, seed, maxFailures: 50 });
  console.log(`fuzz ${r.format}: ${r.cases} cases from ${seeds.length} seeds, ${r.opened} read, ${r.refused} refused with a typed error, ` +
    `${r.failures.length} failures, slowest case ${r.slowestMs.toFixed(1)} ms, ${(r.cases / r.seconds).toFixed(0)} cases/s`);
  for (const f of r.failures) console.log(`  FAIL case ${f.caseNumber} (${f.seed}; ${f.mutation}): ${f.error}`);
  failed += r.failures.length;
}
process.exitCode = failed > 0 ? 1 : 0;
