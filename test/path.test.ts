// Proves the dependency-path rule of SPEC §4 on the spec's own example, with distracting files present.
import t from 'tap';
import { dependencyPath } from '../src/chain/path.js';
import { formatImageName, parseImageName } from '../src/chain/names.js';
import type { ChainFile } from '../src/chain/folder.js';
import type { ImageHeader } from '../src/chain/image/layout.js';

function file(name: string, first: number): ChainFile {
  const n = parseImageName(name)!;
  return { ...n, name, path: `/x/${name}`, first, header: { first, last: n.last } as unknown as ImageHeader };
}

const files = [
  file('C_VOL-b002.spf', 0),
  file('C_VOL-b002-i042-cd-cm.spi', 1),
  file('C_VOL-b002-i042-cd.spi', 40), // covered by the monthly ending at the same point
  file('C_VOL-b002-i222-cd-cm.spi', 43),
  file('C_VOL-b002-i407-cd-cm.spi', 223),
  file('C_VOL-b002-i593-cd-cm.spi', 408),
  file('C_VOL-b002-i593-cd.spi', 590),
  file('C_VOL-b002-i593.spi', 593),
  file('C_VOL-b002-i620-cd-cw.spi', 594),
  file('C_VOL-b002-i620-cd.spi', 615),
  file('C_VOL-b002-i620.spi', 620),
  file('C_VOL-b002-i624-cd.spi', 621),
  file('C_VOL-b002-i624.spi', 624),
  file('C_VOL-b002-i630-cd.spi', 625),
  file('C_VOL-b002-i630.spi', 630),
  file('C_VOL-b002-i631.spi', 631),
  file('C_VOL-b002-i632.spi', 632),
  file('C_VOL-b002-i633.spi', 633),
];

t.test('the SPEC §4 example path', async (t) => {
  const target = files.find((f) => f.name === 'C_VOL-b002-i633.spi')!;
  t.same(dependencyPath(target, files).map((f) => f.name), [
    'C_VOL-b002-i633.spi', 'C_VOL-b002-i632.spi', 'C_VOL-b002-i631.spi', 'C_VOL-b002-i630-cd.spi', 'C_VOL-b002-i624-cd.spi',
    'C_VOL-b002-i620-cd-cw.spi', 'C_VOL-b002-i593-cd-cm.spi', 'C_VOL-b002-i407-cd-cm.spi', 'C_VOL-b002-i222-cd-cm.spi',
    'C_VOL-b002-i042-cd-cm.spi', 'C_VOL-b002.spf',
  ]);
});

t.test('same range at the same point: the higher level wins', async (t) => {
  const day = [file('C_VOL-b001.spf', 0), file('C_VOL-b001-i001.spi', 1), file('C_VOL-b001-i001-cd.spi', 1), file('C_VOL-b001-i002.spi', 2)];
  t.same(dependencyPath(day[3]!, day).map((f) => f.name), ['C_VOL-b001-i002.spi', 'C_VOL-b001-i001-cd.spi', 'C_VOL-b001.spf']);
});

t.test('a missing link or base is a broken chain', async (t) => {
  const broken = files.filter((f) => f.name !== 'C_VOL-b002-i624-cd.spi' && f.name !== 'C_VOL-b002-i624.spi');
  t.throws(() => dependencyPath(broken.find((f) => f.last === 633)!, broken), { code: 'CHAIN_BROKEN', message: /ends at incremental 624/ });
  const noBase = files.filter((f) => f.last !== 0);
  t.throws(() => dependencyPath(noBase.find((f) => f.last === 633)!, noBase), { code: 'CHAIN_BROKEN', message: /base C_VOL-b002.spf/ });
  t.equal(formatImageName({ volume: 'C_VOL', base: 2, last: 0, levelBits: 0 }), 'C_VOL-b002.spf');
});
