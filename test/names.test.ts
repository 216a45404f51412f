// Proves that every chain file name of SPEC §2 parses and formats back, and that non-names are refused.
import t from 'tap';
import { formatImageName, levelRank, parseImageName } from '../src/chain/names.js';
import { LEVEL_BITS } from '../src/chain/image/layout.js';

const { cd, cw, cm, cr } = LEVEL_BITS;

t.test('names round-trip', async (t) => {
  const cases: [string, number, number, number][] = [
    ['C_VOL-b002.spf', 2, 0, 0],
    ['C_VOL-b002-i633.spi', 2, 633, 0],
    ['C_VOL-b002-i630-cd.spi', 2, 630, cd],
    ['C_VOL-b002-i620-cd-cw.spi', 2, 620, cd | cw],
    ['C_VOL-b002-i593-cd-cm.spi', 2, 593, cd | cm],
    ['C_VOL-b002-i593-cd-cw-cm.spi', 2, 593, cd | cw | cm],
    ['C_VOL-b002-i042-cd-cm-cr.spi', 2, 42, cd | cm | cr],
    ['C_VOL-b002-i042-cd-cw-cm-cr.spi', 2, 42, cd | cw | cm | cr],
    ['C_VOL-b001-i1000.spi', 1, 1000, 0],
    ['D_VOL-b1234-i12345-cd.spi', 1234, 12345, cd],
    ['C_VOL-b001-i001.spi', 1, 1, 0],
  ];
  for (const [name, base, last, bits] of cases) {
    const p = parseImageName(name);
    t.same(p, { volume: name.split('-')[0], base, last, levelBits: bits }, name);
    t.equal(formatImageName(p!), name, `${name} formats back`);
  }
  t.equal(formatImageName({ volume: 'C_VOL', base: 7, last: 5, levelBits: 0 }), 'C_VOL-b007-i005.spi');
});

t.test('not names', async (t) => {
  for (const bad of ['C_VOL-b002.spi', 'C_VOL-b002-i003.spf', 'C_VOL-b02.spf', 'C_VOL-b002-i633-cw.spi', 'C_VOL-b002-i633-cr.spi',
    'C_VOL-b002-i633-cm-cd.spi', 'C_VOL-b002-i633-cd-cd.spi', 'C_VOL-b002-i633-cd-cr.spi', 'C_VOL-b002-i000.spi', 'C_VOL.spf', 'C_VOL-b002.md5', 'x.spi']) {
    t.equal(parseImageName(bad), null, bad);
  }
});

t.test('level ranks', async (t) => {
  t.ok(levelRank(0) < levelRank(cd) && levelRank(cd) < levelRank(cd | cw) && levelRank(cd | cw) < levelRank(cd | cm) && levelRank(cd | cm) < levelRank(cd | cm | cr));
  t.equal(levelRank(cd | cw | cm), levelRank(cd | cm));
});
