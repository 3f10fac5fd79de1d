"""Input pipelines (tf.data -> numpy); import `sparse_jax.data.images` to use them.

Kept empty on purpose: the submodules import TensorFlow, which importing the
package should not.
"""
