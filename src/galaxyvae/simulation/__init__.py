"""The embedded simulated survey: SDSS-like r-band stamps of galaxies of eight families (GalSim).

- :mod:`.observing` the telescope: pixel scale, PSF, sky, gain, read noise (SDSS r band)
- :mod:`.canvas`    the oversampled grid a stamp is rendered on (Fourier and real space)
- :mod:`.geometry`  numpy structure: disk-plane coordinates, spiral arms, dust, knots
- :mod:`.families`  the galaxy families: parameter distributions and rendering
- :mod:`.stamp`     one stamp from (seed, index): draw, render, metadata row
- :mod:`.survey`    many stamps over worker processes -> one data set

See docs/simulation.md for the families, the noise model and the parameter distributions.
"""

from galaxyvae.simulation.families import FAMILIES, FAMILY_NAMES
from galaxyvae.simulation.stamp import draw_stamp, render_stamp, spec_from_params
from galaxyvae.simulation.survey import DEFAULT_N_IMAGES, render_survey, simulate_survey

__all__ = ["FAMILIES", "FAMILY_NAMES", "DEFAULT_N_IMAGES", "draw_stamp", "render_stamp", "render_survey",
           "simulate_survey", "spec_from_params"]
