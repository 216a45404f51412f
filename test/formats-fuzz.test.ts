// Proves every disk codec's parser, fed mutated disks (a small run of scripts/bench/fuzz), only ever reads them or refuses them with our typed errors: no other exception, no slow case, no allocation driven by a lying size.
import t from 'tap';
import { fuzzDriver } from '../src/devkit/fuzz.js';
import { fuzzSeeds } from '../src/devkit/fuzz-seeds.js';
import { formats } from '../src/formats/drivers.js';

const CASES = 3000;

for (const driver of formats.drivers) {
  if (driver.format === 'raw') continue;
  t.test(driver.format, async (t) => {
    const seeds = await fuzzSeeds(driver);
    t.ok(seeds.length >= 2, `${seeds.length} seeds`);
    const r = await fuzzDriver(driver, seeds, { cases: CASES, seed: 11, slowMs: 5000 });
    t.equal(r.cases, CASES, `${r.cases} cases: ${r.opened} read, ${r.refused} refused, slowest ${r.slowestMs.toFixed(0)} ms`);
    t.ok(r.refused > CASES / 20, 'mutations do reach the checks');
    t.same(r.failures.map((f) => `case ${f.caseNumber} (${f.seed}; ${f.mutation}): ${f.error}`), [], 'no failure');
  });
}

t.test('the registry knows every format', async (t) => {
  t.same([...formats.formats].sort(), ['qcow2', 'raw', 'vhd', 'vhdx', 'vmdk']);
});
