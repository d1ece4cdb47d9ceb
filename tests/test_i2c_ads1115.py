"""ADS1115: config encoding, single-shot conversions against the emulated chip, scaling to
engineering units, overflow and option errors."""

from __future__ import annotations

import pytest

from agent.config.schema import SensorConfig
from drivers.base import BuildContext, ConfigurationError, DeviceNotReady, ProtocolError
from drivers.emulated.ads1115 import Ads1115Emulator, cabinet_inputs
from drivers.emulated.i2c_setup import emulated_bus
from drivers.emulated.ina219 import Ina219Emulator
from drivers.i2c import ads1115
from drivers.i2c.ads1115 import code_to_volts, config_word
from drivers.registry import build_sensor

CT = {"mux": "ain0", "pga": 4.096, "quantity": "ct_current", "unit": "A", "scale": 30.0,
      "offset": 0.0}




def make(ctx: BuildContext, chip: Ads1115Emulator | None = None,
         **options: object) -> tuple[ads1115.Ads1115Sensor, Ads1115Emulator]:
    if chip is not None:
        emulated_bus(ctx).attach(0x48, chip)
    cfg = SensorConfig(name="adc", driver="ads1115", bus="emulated", address=0x48,
                       options=dict(options))
    sensor = build_sensor(cfg, ctx)
    attached = emulated_bus(ctx).chip(0x48)
    assert isinstance(attached, Ads1115Emulator)
    return sensor, attached


def test_config_word_datasheet_example() -> None:
    # AIN0 vs GND, +-4.096 V, 128 SPS, single shot, comparator off = 0xC383
    assert config_word(0b100, 0b001, 0b100) == 0xC383


def test_code_to_volts() -> None:
    assert code_to_volts(0x7FFF, 1) == pytest.approx(4.096 * 32767 / 32768)
    assert code_to_volts(0x8000, 1) == -4.096
    assert code_to_volts(0x0001, 5) == pytest.approx(0.256 / 32768)
    assert code_to_volts(0xFFFF, 0) == pytest.approx(-6.144 / 32768)


async def test_single_shot_with_scale_and_differential(ctx: BuildContext) -> None:
    sensor, chip = make(ctx, channels=[CT, {"mux": "ain2-ain3", "pga": 2.048}])
    chip.set_input(0, 0.5)  # 15 A through a 30 A/V clamp
    chip.set_input(2, 1.7)
    chip.set_input(3, 0.2)
    await sensor.open()
    bus = emulated_bus(ctx)
    bus.clear_log()
    readings = await sensor.sample()
    assert [(r.quantity, r.unit) for r in readings] == [("ct_current", "A"), ("ain2_ain3", "V")]
    assert readings[0].value == pytest.approx(15.0, abs=30 * 4.096 / 32768)
    assert readings[1].value == pytest.approx(1.5, abs=2.048 / 32768)
    writes = [e for e in bus.log if e[0] == "write_i2c_block_data"]
    assert writes == [
        ("write_i2c_block_data", 0x48, 1, (0xC3, 0x83)),  # OS, AIN0, 4.096 V, single, 128 SPS
        ("write_i2c_block_data", 0x48, 1, (0xB5, 0x83)),  # OS, AIN2-AIN3, 2.048 V
    ]
    # each conversion: start, one OS poll after 1.1/DR, then the conversion register
    assert [e[0] for e in bus.log] == ["write_i2c_block_data", "i2c_rdwr", "i2c_rdwr"] * 2
    assert chip.conversions == 2


async def test_default_channels_are_four_single_ended_volts(ctx: BuildContext) -> None:
    sensor, chip = make(ctx, data_rate=860)
    for pin, volts in enumerate((0.1, 0.2, 0.3, 0.4)):
        chip.set_input(pin, volts)
    await sensor.open()
    readings = await sensor.sample()
    assert [r.quantity for r in readings] == ["ain0", "ain1", "ain2", "ain3"]
    assert [round(r.value, 3) for r in readings] == [0.1, 0.2, 0.3, 0.4]
    assert {r.unit for r in readings} == {"V"}


async def test_input_beyond_full_scale_is_flagged(ctx: BuildContext) -> None:
    sensor, chip = make(ctx, channels=[{"mux": "ain1", "pga": 0.256}])
    chip.set_input(1, 0.4)
    await sensor.open()
    (reading,) = await sensor.sample()
    assert reading.quality == "suspect"
    assert reading.reasons == ("overflow",)
    assert sensor.counters["overflow"] == 1


async def test_slow_oscillator_is_waited_for(ctx: BuildContext) -> None:
    # 1.8 times slower than nominal: the first OS poll (after 1.1/DR) finds it converting,
    # and reading the conversion register then would give the power-on value 0.
    sensor, _ = make(ctx, Ads1115Emulator(oscillator=1.8), channels=[{"mux": "ain2"}])
    await sensor.open()
    (reading,) = await sensor.sample()
    assert reading.value == pytest.approx(1.65, abs=1e-3)


async def test_stuck_conversion_is_a_bounded_wait(ctx: BuildContext) -> None:
    sensor, _ = make(ctx, Ads1115Emulator(oscillator=1000.0), channels=[{"mux": "ain0"}],
                     data_rate=860)
    await sensor.open()
    with pytest.raises(DeviceNotReady) as err:
        await sensor.sample()
    assert "conversion of ain0 (OS bit) not done" in str(err.value)
    assert "i2c-emulated 0x48" in str(err.value)


async def test_another_chip_at_the_address_is_refused(ctx: BuildContext) -> None:
    # An INA219 strapped to 0x48: pointer 1 is its shunt register, not a config register.
    ina = Ina219Emulator()
    ina.pin(12.0, 0.5)  # 50 mV on the shunt: 0x1388 in its register 1
    emulated_bus(ctx).attach(0x48, ina)
    cfg = SensorConfig(name="adc", driver="ads1115", bus="emulated", address=0x48)
    sensor = build_sensor(cfg, ctx)
    await sensor.open()
    with pytest.raises(ProtocolError) as err:
        await sensor.sample()
    assert str(err.value) == ("i2c-emulated 0x48 reg 0x01: config reads back 0x1388 after "
                              "writing 0xC383: not an ADS1115, or it was reset")


def test_cabinet_inputs_vary_with_load() -> None:
    fan_on = cabinet_inputs(12 * 3600.0 + 60.0)[0]
    fan_off = cabinet_inputs(12 * 3600.0 + 600.0)[0]
    assert fan_on - fan_off == pytest.approx(3.5 / 30.0, abs=0.01)
    assert 0.0 < fan_off < 1.0


@pytest.mark.parametrize(("options", "message"), [
    ({"channels": [{"mux": "ain4"}]}, "'ain4' is not an input"),
    ({"channels": [{"mux": "ain0", "pga": 3.3}]}, "3.3 V is not a full-scale range"),
    ({"channels": [{"mux": "ain0", "unit": "amps"}]}, "options.channels.0.unit"),
    ({"channels": [{"mux": "ain0"}, {"mux": "AIN0"}]}, "two channels are named 'ain0'"),
    ({"channels": []}, "options.channels"),
    ({"data_rate": 100}, "options.data_rate"),
    ({"channels": [{"mux": "ain0", "quantity": "CT current"}]}, "options.channels.0.quantity"),
])
async def test_bad_options_name_the_key(ctx: BuildContext, options: dict[str, object],
                                        message: str) -> None:
    cfg = SensorConfig(name="adc", driver="ads1115", bus="emulated", address=0x48,
                       options=options)
    with pytest.raises(ConfigurationError) as err:
        build_sensor(cfg, ctx)
    assert message in str(err.value)
