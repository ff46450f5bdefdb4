"""Records a genuine Keras progress-bar log: a tiny Dense model fitted with verbose=1.

Run with stdout redirected to a file, and a path for the losses Keras recorded (see README.txt).
Works on Keras 3 (TensorFlow backend) and on Keras 2.3.1 (Theano backend, Python 3.7): it uses
only what both have.
"""

import json
import sys
import time

import keras
import numpy as np

np.random.seed(0)
x = np.random.rand(200, 4).astype("float32")
y = np.random.rand(200, 1).astype("float32")

model = keras.models.Sequential(
    [keras.layers.Dense(8, activation="relu", input_shape=(4,)), keras.layers.Dense(1)]
)
model.compile(optimizer="sgd", loss="mse")


class Pause(keras.callbacks.Callback):
    """Sleeps past the bar's 0.05 s update interval every 6th batch: a few redraws per epoch."""

    def on_batch_end(self, batch, logs=None):
        if batch % 6 == 5:
            time.sleep(0.06)


history = model.fit(x, y, batch_size=8, epochs=3, verbose=1, callbacks=[Pause()])
# The losses Keras itself recorded, for the tests to check the collapsed bars against.
with open(sys.argv[1], "w") as f:
    json.dump({"loss": [f"{v:.4f}" for v in history.history["loss"]]}, f)
    f.write("\n")
